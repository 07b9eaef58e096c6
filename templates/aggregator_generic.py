"""The aggregation: runs once per epoch on the aggregation node. Edit `aggregate`.

flame calls `aggregate(results, epoch, previous)` with
  results   {node id: what that node's analyze returned this epoch}
  epoch     the epoch number
  previous  your aggregate of the previous epoch (None in epoch 0)
and sends the return value back to every node (as their `previous`). After the last epoch it
is the final result. Optionally define `converged(current, previous, epoch) -> bool` to stop
early; without it the run lasts FLAME_EPOCHS epochs (default 1).
"""


def aggregate(results, epoch, previous):
    count = sum(r["count"] for r in results.values())
    total = sum(r["sum"] for r in results.values())
    return {"count": count, "mean": total / count if count else None}


def converged(current, previous, epoch):
    return True  # a mean is exact after one epoch

"""Differentially private mean age: each node releases a noisy sum and a noisy count.

The node runtime computes both itself from the `age` column: it clips ages to the bounds the
data holder declares in its policy (`policy.toml`: [dp_bounds] age = [0, 100]), so one
person changes a node's sum by at most 100 (the sensitivity, derived by OpenDP, not claimed
here) and its count by 1, adds Laplace noise drawn by OpenDP and charges epsilon
0.5 + 0.5 = 1.0 per run to the node's budget (3.0 in all), declared up front with
`@flame.dp.spends` so an exhausted node refuses before reading data.
"""

import flame


@flame.dp.spends(epsilon=1.0)
def analyze(data, epoch, previous):
    return {
        "sum": flame.dp.sum("age", epsilon=0.5),  # missing ages are dropped by the runtime
        "n": flame.dp.count("age", epsilon=0.5),
    }


def aggregate(results, epoch, previous):
    total = sum(r["sum"] for r in results.values())
    n = sum(r["n"] for r in results.values())
    return {"mean": total / max(n, 1.0), "n": n}

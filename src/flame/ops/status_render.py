"""How `flame status` prints a run: a snapshot, an epoch, a change while watching."""

from __future__ import annotations

import time

from flame.ops.status_records import EpochInfo, RunStatus, StatusChange

__all__ = ["render_change", "render_epoch", "render_status"]

# ------------------------------------------------------------------------- rendering (CLI)


def _clock(moment: float | None) -> str:
    if moment is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(moment))


def render_status(run: RunStatus) -> list[str]:
    """The lines `flame status` prints for a snapshot."""
    lines: list[str] = []
    head = f"analysis {run.analysis_id}: {run.state}"
    if run.epochs is not None:
        head += f" after {run.epochs} epoch{'s' if run.epochs != 1 else ''}"
    if run.converged:
        head += ", converged"
    lines.append(head)
    for problem in run.problems:
        lines.append(f"  ! {problem}")
    if run.nodes:
        lines.append("nodes")
        width = max(len(node) for node in run.nodes)
        for node, status in sorted(
            run.nodes.items(), key=lambda item: (item[1].role != "aggregation", item[0])
        ):
            role = status.role or ""
            at = f"  (at {_clock(status.time)})" if status.time is not None else ""
            signed = ""
            if status.verified is not None:
                signed = (
                    "  [signed, verified]"
                    if status.verified
                    else "  [NOT VERIFIED: bad or no signature]"
                )
            lines.append(f"  {node:<{width}}  {role:<11}  {status.describe()}{at}{signed}")
    if run.history:
        lines.append("epochs")
        for record in run.history:
            lines.append("  " + render_epoch(record))
    final = run.result_location
    if final is not None:
        lines.append("final result")
        size = f", {final.size} bytes" if final.size is not None else ""
        lines.append(f"  {final.location}{size}")
        if final.sha256:
            lines.append(f"  sha256 {final.sha256}")
    return lines


def render_epoch(record: EpochInfo) -> str:
    answered = len(record.nodes)
    total = answered + len(record.missing)
    text = f"epoch {record.epoch}: {answered}/{total} answered"
    if record.nodes:
        text += f" ({', '.join(record.nodes)})"
    if record.missing:
        text += f", missing {', '.join(record.missing)}"
    if record.started is not None:
        text += f", started {_clock(record.started)}"
    if record.duration is not None:
        text += f", {record.duration:.3f} s"
    if record.converged:
        text += ", converged"
    return text


def render_change(change: StatusChange) -> str:
    """One line per change for `flame status --watch`."""
    stamp = _clock(change.at)
    if change.kind == "node" and change.node is not None:
        node = change.node
        role = f" ({node.role})" if node.role == "aggregation" else ""
        return f"{stamp} {node.node}{role}: {node.describe()}"
    if change.kind == "epoch" and change.epoch is not None:
        return f"{stamp} {render_epoch(change.epoch)}"
    if change.kind == "watching":
        return f"{stamp} watching"
    run = change.run
    state = run.state if run is not None else "ended"
    return f"{stamp} run {state}"

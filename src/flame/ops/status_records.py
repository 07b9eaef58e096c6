"""What run status is made of: one node's retained status, an epoch, the final result, a run.

Parsed from the broker's retained status messages and the aggregator's manifest; shared by
the reader (`flame.ops.status`) and the rendering (`flame.ops.status_render`). Pure data: no
network, no storage.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from flame.errors import FlameError
from flame.transport.status_order import process_fields

__all__ = [
    "FINAL_STATES",
    "MAX_STATUS_BYTES",
    "EpochInfo",
    "FinalResult",
    "NodeStatus",
    "RunStatus",
    "StatusChange",
    "StatusError",
]

FINAL_STATES = ("done", "failed")
MAX_STATUS_BYTES = 64 * 1024


class StatusError(FlameError):
    """Status could not be read (no broker or storage configured, or neither reachable)."""


@dataclass(frozen=True)
class NodeStatus:
    """One node's retained status, as it published it."""

    node: str
    state: str
    role: str | None = None
    epoch: int | None = None
    time: float | None = None
    progress: float | None = None
    reason: str | None = None
    session: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # Signed by that node's roster key (True), not (False), or no roster to check with (None).
    verified: bool | None = field(default=None, compare=False)
    # The node's state now (True), or a status of another run / an earlier status replayed or
    # left over (False, `stale` says why); None: it carries nothing to tell (older flame).
    current: bool | None = field(default=None, compare=False)
    stale: str | None = field(default=None, compare=False)

    @classmethod
    def from_payload(cls, node: str, payload: Any) -> NodeStatus | None:
        """The status in `payload` (a JSON object), or None if it is not one."""
        if not isinstance(payload, dict) or not isinstance(payload.get("state"), str):
            return None

        def num(key: str) -> float | None:
            value = payload.get(key)
            return (
                float(value)
                if isinstance(value, int | float) and not isinstance(value, bool)
                else None
            )

        epoch = payload.get("epoch")
        known = {"state", "role", "epoch", "time", "progress", "reason", "session", "sig"}
        return cls(
            node=node,
            state=payload["state"][:64],
            role=str(payload["role"])[:32] if isinstance(payload.get("role"), str) else None,
            epoch=epoch
            if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0
            else None,
            time=num("time"),
            progress=num("progress"),
            reason=str(payload["reason"])[:500] if payload.get("reason") else None,
            session=str(payload["session"])[:64] if payload.get("session") else None,
            extra={k: v for k, v in payload.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "state": self.state,
            "role": self.role,
            "epoch": self.epoch,
            "time": self.time,
            "progress": self.progress,
            "reason": self.reason,
            "verified": self.verified,
            "current": self.current,
            **({"stale": self.stale} if self.stale else {}),
            **self.extra,
        }

    def describe(self) -> str:
        """`computing epoch 2 (40%)`, `failed in epoch 1: ValueError: ...`, `offline`."""
        text = self.state
        last = self.extra.get("last_state")
        if self.state == "offline" and isinstance(last, str) and last:
            text += f" (last: {last[:64]})"
        if self.epoch is not None and self.state not in ("offline",):
            text += f" {'in ' if self.state == 'failed' else ''}epoch {self.epoch}"
        if self.state == "computing" and self.progress is not None:
            text += f" ({self.progress:.0%})"
        if self.reason and self.verified is not False:  # a forged status's text: not shown
            text += f": {self.reason}"
        if self.current is False:
            text += f"  [NOT CURRENT: {self.stale or 'stale'}]"
        return text

    def fields(self) -> dict[str, Any]:
        """The status as the node published it (what `StatusOrder` looks at)."""
        return {**self.extra, "state": self.state}


@dataclass(frozen=True)
class EpochInfo:
    """One epoch as the aggregator recorded it: who answered, when it started, how long."""

    epoch: int
    nodes: list[str]
    missing: list[str]
    started: float | None
    duration: float | None
    converged: bool = False

    @classmethod
    def from_dict(cls, data: Any) -> EpochInfo | None:
        if not isinstance(data, dict) or not isinstance(data.get("epoch"), int):
            return None
        started = data.get("started")
        duration = data.get("duration_s", data.get("duration"))
        return cls(
            epoch=int(data["epoch"]),
            nodes=[str(n) for n in data.get("nodes") or []],
            missing=[str(n) for n in data.get("missing") or []],
            started=float(started) if isinstance(started, int | float) else None,
            duration=float(duration) if isinstance(duration, int | float) else None,
            converged=bool(data.get("converged", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "nodes": self.nodes,
            "missing": self.missing,
            "started": self.started,
            "duration_s": self.duration,
            "converged": self.converged,
        }


@dataclass(frozen=True)
class FinalResult:
    """Where the final result is and what it must hash to."""

    key: str
    location: str
    sha256: str | None
    size: int | None
    created: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "location": self.location,
            "sha256": self.sha256,
            "size": self.size,
            "created": self.created,
        }


@dataclass
class RunStatus:
    """Everything known about one analysis run."""

    analysis_id: str
    nodes: dict[str, NodeStatus] = field(default_factory=dict)
    aggregator_id: str | None = None
    history: list[EpochInfo] = field(default_factory=list)
    final: FinalResult | None = None
    epochs: int | None = None
    converged: bool | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def aggregator(self) -> NodeStatus | None:
        for node, status in self.nodes.items():
            if status.role == "aggregation" or node == self.aggregator_id:
                return status
        return None

    @property
    def result_location(self) -> FinalResult | None:
        """The final result: from storage, else as the aggregator's current status announced
        it; nothing from a status that is not verified (forged) or not current (red team B6)."""
        if self.final is not None:
            return self.final
        aggregator = self.aggregator
        if aggregator is None or aggregator.verified is False or aggregator.current is False:
            return None
        location = aggregator.extra.get("location")
        if not isinstance(location, str) or not location:
            return None
        sha256 = aggregator.extra.get("sha256")
        return FinalResult("", location, sha256 if isinstance(sha256, str) else None, None)

    @property
    def state(self) -> Literal["finished", "failed", "running", "unknown"]:
        """From current statuses only: a replayed or left-over one does not set the state."""
        aggregator = self.aggregator
        if aggregator is not None and aggregator.current is False:
            aggregator = None
        if aggregator is not None and aggregator.state == "failed":
            return "failed"
        if self.final is not None or (aggregator is not None and aggregator.state == "done"):
            return "finished"
        # Without the aggregator's current status, nodes that said goodbye do not make a run.
        if any(
            s.state != "offline"
            and s.current is not False
            and (aggregator is not None or s.extra.get("online") is not False)
            for s in self.nodes.values()
        ):
            return "running"
        return "unknown"

    def to_dict(self) -> dict[str, Any]:
        return {
            "analysis_id": self.analysis_id,
            "state": self.state,
            "nodes": {node: s.to_dict() for node, s in sorted(self.nodes.items())},
            "history": [record.to_dict() for record in self.history],
            "final": final.to_dict() if (final := self.result_location) else None,
            "epochs": self.epochs,
            "converged": self.converged,
            "problems": self.problems,
        }


@dataclass(frozen=True)
class StatusChange:
    """What `watch` reports: a node's new status, or an epoch the aggregator completed."""

    kind: Literal["watching", "node", "epoch", "end"]
    at: float
    node: NodeStatus | None = None
    previous: NodeStatus | None = None
    epoch: EpochInfo | None = None
    run: RunStatus | None = None


def _parse_status(
    node: str, payload: bytes, check: Callable[[str, dict[str, Any]], bool] | None = None
) -> NodeStatus | None:
    if not payload or len(payload) > MAX_STATUS_BYTES:
        return None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    status = NodeStatus.from_payload(node, data)
    if status is not None and check is not None:
        status = replace(status, verified=check(node, data))
    return status


def _mark_current(found: dict[str, NodeStatus]) -> dict[str, NodeStatus]:
    """Each status marked current or not, from one snapshot of the retained statuses.

    The run now is the one named by the most recently signed (verified) status; a status of
    another run is a leftover or a replay (`flame.transport.status_order`). A snapshot cannot
    tell more: a replay of a whole earlier run, every node at once, looks like that run."""
    newest: tuple[float, str] | None = None
    for status in found.values():
        fields = process_fields(status.fields())
        run = status.extra.get("run")
        usable = fields is not None and isinstance(run, str) and status.verified is not False
        if usable and fields is not None and (newest is None or fields[3] > newest[0]):
            newest = (fields[3], str(run))
    marked = {}
    for node, status in found.items():
        run = status.extra.get("run")
        if status.verified is False:
            status = replace(status, current=False, stale="bad or no signature")
        elif newest is not None and isinstance(run, str) and run != newest[1]:
            stale = f"of run {run[:16]}, not the newest run {newest[1][:16]}"
            status = replace(status, current=False, stale=stale)
        elif process_fields(status.fields()) is not None:
            status = replace(status, current=True)
        marked[node] = status
    return marked


def _all_settled(known: dict[str, NodeStatus], aggregator_id: str) -> bool:
    """Every analysis node has said its last word (done, failed) or gone offline."""
    return all(
        status.state in (*FINAL_STATES, "offline")
        for node, status in known.items()
        if node != aggregator_id and status.role != "aggregation"
    )


def _same(a: NodeStatus, b: NodeStatus) -> bool:
    return (a.state, a.epoch, a.progress, a.reason, a.session) == (
        b.state,
        b.epoch,
        b.progress,
        b.reason,
        b.session,
    )

"""What a run produces and reports: epoch records, the final result, progress events."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = [
    "Checkpoint",
    "EpochRecord",
    "Event",
    "EventSink",
    "RunResult",
    "RunStore",
    "numeric_summary",
]


@dataclass(frozen=True)
class EpochRecord:
    """Who answered an epoch and how long it took."""

    epoch: int
    nodes: list[str]
    missing: list[str]
    started: float
    duration: float
    converged: bool
    bytes_received: int = 0
    bytes_sent: int = 0
    arrivals: dict[str, float] = field(default_factory=dict)  # node -> s after the start
    result_bytes: dict[str, int] = field(default_factory=dict)  # node -> size of its result
    summary: dict[str, float] = field(default_factory=dict)  # numeric fields of the aggregate
    privacy: dict[str, Any] = field(default_factory=dict)  # node -> DP spend, suppressed cells
    absent: dict[str, str] = field(default_factory=dict)  # node -> why it sent no result
    data: dict[str, str] = field(default_factory=dict)  # node -> data version (fingerprints)

    def to_dict(self, *, summary: bool = True) -> dict[str, Any]:
        """JSON-ready; `summary=False` leaves out the aggregate's numbers (for status
        announcements, which operators see without access to results)."""
        data: dict[str, Any] = {
            "epoch": self.epoch,
            "nodes": self.nodes,
            "missing": self.missing,
            "started": self.started,
            "duration_s": round(self.duration, 6),
            "converged": self.converged,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
        }
        if self.arrivals:
            data["arrivals_s"] = {n: round(t, 6) for n, t in self.arrivals.items()}
        if self.result_bytes:
            data["result_bytes"] = dict(self.result_bytes)
        if summary and self.summary:
            data["summary"] = dict(self.summary)
        if self.privacy:
            data["privacy"] = dict(self.privacy)
        if self.absent:
            data["absent"] = dict(self.absent)
        if self.data:
            data["data_versions"] = dict(self.data)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochRecord:
        """Back from `to_dict` (checkpoints, manifests, `--output` files)."""
        return cls(
            epoch=int(data["epoch"]),
            nodes=[str(n) for n in data["nodes"]],
            missing=[str(n) for n in data["missing"]],
            started=float(data["started"]),
            duration=float(data["duration_s"]),
            converged=bool(data["converged"]),
            bytes_received=int(data.get("bytes_received", 0)),
            bytes_sent=int(data.get("bytes_sent", 0)),
            arrivals={str(k): float(v) for k, v in (data.get("arrivals_s") or {}).items()},
            result_bytes={str(k): int(v) for k, v in (data.get("result_bytes") or {}).items()},
            summary={str(k): float(v) for k, v in (data.get("summary") or {}).items()},
            privacy=dict(data.get("privacy") or {}),
            absent={str(k): str(v) for k, v in (data.get("absent") or {}).items()},
            data={str(k): str(v) for k, v in (data.get("data_versions") or {}).items()},
        )


SUMMARY_FIELDS = 64  # at most this many numbers of an aggregate are kept per epoch
SUMMARY_ARRAY = 16  # arrays up to this size are kept element by element


def numeric_summary(value: Any, limit: int = SUMMARY_FIELDS) -> dict[str, float]:
    """The numbers of an aggregate by path (`coef[2]`, `age.mean`): what a report plots
    over the epochs. Scalars, and small numeric arrays/lists element by element; at most
    `limit` entries, in the aggregate's order. Non-finite numbers are left out."""
    out: dict[str, float] = {}

    def walk(item: Any, path: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(item, bool) or item is None or isinstance(item, (str, bytes)):
            return
        if isinstance(item, dict):
            for key, sub in item.items():
                walk(sub, f"{path}.{key}" if path else str(key))
            return
        if isinstance(item, (list, tuple)):
            if len(item) <= SUMMARY_ARRAY:
                for i, sub in enumerate(item):
                    walk(sub, f"{path}[{i}]")
            return
        size, kind = getattr(item, "size", None), getattr(getattr(item, "dtype", None), "kind", "")
        if kind and kind in "iuf" and isinstance(size, int):
            if getattr(item, "ndim", 0) == 0:
                walk(item.item(), path)
            elif size <= SUMMARY_ARRAY:
                flat = item.to_numpy() if hasattr(item, "to_numpy") else item  # a pandas Series
                for i, sub in enumerate(flat.reshape(-1).tolist()):
                    walk(sub, f"{path}[{i}]")
            return
        if isinstance(item, (int, float)):
            number = float(item)
            if number == number and abs(number) != float("inf"):
                out[path or "value"] = number

    walk(value, "")
    return out


@dataclass(frozen=True)
class RunResult:
    """The final aggregate and how the run got there."""

    analysis_id: str
    value: Any
    converged: bool
    epochs: int
    history: list[EpochRecord] = field(default_factory=list)
    location: str | None = None

    def to_dict(self) -> dict[str, Any]:
        from flame.wire.envelope import to_jsonable

        return {
            "analysis_id": self.analysis_id,
            "result": to_jsonable(self.value),
            "converged": self.converged,
            "epochs": self.epochs,
            "history": [record.to_dict() for record in self.history],
            "location": self.location,
        }

    def history_frame(self) -> Any:
        """The history as a pandas DataFrame, one row per (epoch, node): answered or
        missing, arrival time and result size, plus the epoch's duration and bytes.
        Needs pandas (`pip install 'flame[pandas]'`)."""
        try:
            import pandas as pd
        except ImportError:
            from flame.errors import FlameError

            raise FlameError(
                "RunResult.history_frame() needs pandas: pip install 'flame[pandas]'"
            ) from None
        rows = [
            {
                "epoch": record.epoch,
                "node": node,
                "state": "answered" if node in record.nodes else "missing",
                "arrival_s": record.arrivals.get(node),
                "result_bytes": record.result_bytes.get(node),
                "epoch_duration_s": record.duration,
                "epoch_bytes_received": record.bytes_received,
                "epoch_bytes_sent": record.bytes_sent,
                "converged": record.converged,
            }
            for record in self.history
            for node in sorted({*record.nodes, *record.missing})
        ]
        columns = [
            "epoch", "node", "state", "arrival_s", "result_bytes", "epoch_duration_s",
            "epoch_bytes_received", "epoch_bytes_sent", "converged",
        ]  # fmt: skip
        return pd.DataFrame(rows, columns=columns)


@dataclass(frozen=True)
class Event:
    """A progress event from the aggregator, for terminals and status displays."""

    kind: Literal["waiting", "epoch_started", "result", "epoch_finished", "finished", "failed"]
    epoch: int = -1
    node: str | None = None
    received: int = 0
    expected: int = 0
    record: EpochRecord | None = None
    detail: str = ""


EventSink = Callable[[Event], None]


@dataclass(frozen=True)
class Checkpoint:
    """Enough to resume after the last completed epoch."""

    next_epoch: int
    previous: Any
    history: list[EpochRecord]
    run: str | None = None
    """The run id of the kick-offs (the nodes' run): only this run may be continued."""


class RunStore(Protocol):
    """Where the aggregator keeps checkpoints and the final result (storage issue plugs in)."""

    def load_final(self) -> RunResult | None:
        """The result of a run that already finished under this analysis id, if any."""
        ...

    def load_checkpoint(self) -> Checkpoint | None: ...

    def save_checkpoint(self, checkpoint: Checkpoint) -> None: ...

    def save_final(self, result: RunResult) -> str: ...

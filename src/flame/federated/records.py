"""What a run produces and reports: epoch records, the final result, progress events."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = ["Checkpoint", "EpochRecord", "Event", "EventSink", "RunResult", "RunStore"]


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "nodes": self.nodes,
            "missing": self.missing,
            "started": self.started,
            "duration_s": round(self.duration, 6),
            "converged": self.converged,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
        }


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
        from flame.messages import to_jsonable

        return {
            "analysis_id": self.analysis_id,
            "result": to_jsonable(self.value),
            "converged": self.converged,
            "epochs": self.epochs,
            "history": [record.to_dict() for record in self.history],
            "location": self.location,
        }


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


class RunStore(Protocol):
    """Where the aggregator keeps checkpoints and the final result (storage issue plugs in)."""

    def load_final(self) -> RunResult | None:
        """The result of a run that already finished under this analysis id, if any."""
        ...

    def load_checkpoint(self) -> Checkpoint | None: ...

    def save_checkpoint(self, checkpoint: Checkpoint) -> None: ...

    def save_final(self, result: RunResult) -> str: ...

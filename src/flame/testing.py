"""Helpers for testing an analysis in your own pytest suite, against the in-memory broker.

    from flame.testing import run_federation
    result = run_federation(analyze, aggregate, data={"a": {"x.csv": "v\\n1\\n"}, ...})

Messages are really encoded and decoded, so a value that cannot travel fails here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flame.aggregator.records import RunResult
from flame.config import FlameConfig, load_config
from flame.data import Data, MemorySource
from flame.simulate import DataSpec, simulate
from flame.transport.memory import MemoryBroker, MemoryTransport
from flame.wire.envelope import Envelope

__all__ = ["MemoryBroker", "MemoryTransport", "memory_data", "run_federation"]


def memory_data(files: dict[str, bytes | str], node_id: str = "test") -> Data:
    """A data handle over in-memory files, for calling `analyze` directly."""
    return Data({"memory": MemorySource(files)}, node_id=node_id)


def run_federation(
    analyze: Callable[..., Any],
    aggregate: Callable[..., Any],
    converged: Callable[..., Any] | None = None,
    *,
    data: DataSpec,
    epochs: int = 1,
    seed: int | None = 0,
    duplicate_every: int = 0,
    drop: Callable[[Envelope], bool] | None = None,
    epoch_timeout: float = 30.0,
    quorum: int | None = None,
    config: FlameConfig | None = None,
) -> RunResult:
    """Simulate a federation in memory with test-friendly defaults (short timeouts, seeded).

    `duplicate_every=N` delivers every N-th message twice; `drop(envelope) -> True` loses
    a message (e.g. one node's result), to test quorum and timeouts.
    """
    broker = MemoryBroker(
        duplicate_every=duplicate_every,
        on_send=None if drop is None else (lambda envelope: not drop(envelope)),
    )
    if config is None:
        config = load_config(
            epochs=epochs,
            seed=seed,
            epoch_timeout=epoch_timeout,
            presence_timeout=epoch_timeout,
            quorum=quorum,
        )
    return simulate(analyze, aggregate, converged, data=data, config=config, broker=broker)

"""flame: federated analytics as two plain functions.

Write `analyze(data, epoch, previous)` (runs next to each data holder) and
`aggregate(results, epoch, previous)` (runs once per epoch), optionally
`converged(current, previous, epoch)`. Then `flame.simulate(...)` runs them on one machine
and `flame.run(...)` plays one node's role in production.
"""

from flame.config import FlameConfig, load_config
from flame.data import Data
from flame.errors import (
    AnalysisLoadError,
    ConfigError,
    DataError,
    FlameError,
    MessageError,
    RunFailed,
    RunTimeout,
    TransportError,
)
from flame.federated.context import Context, Received, context
from flame.federated.records import EpochRecord, Event, RunResult
from flame.federated.run_store import load_result
from flame.federated.secure import Results, secure
from flame.main import run
from flame.simulate import simulate

__version__ = "0.1.0"

__all__ = [
    "AnalysisLoadError",
    "ConfigError",
    "Context",
    "Data",
    "DataError",
    "EpochRecord",
    "Event",
    "FlameConfig",
    "FlameError",
    "MessageError",
    "Received",
    "Results",
    "RunFailed",
    "RunResult",
    "RunTimeout",
    "TransportError",
    "__version__",
    "context",
    "load_config",
    "load_result",
    "run",
    "secure",
    "simulate",
]

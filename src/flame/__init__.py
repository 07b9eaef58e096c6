"""flame: federated analytics as two plain functions.

Write `analyze(data, epoch, previous)` (runs next to each data holder) and
`aggregate(results, epoch, previous)` (runs once per epoch), optionally
`converged(current, previous, epoch)`. Then `flame.simulate(...)` runs them on one machine
and `flame.run(...)` plays one node's role in production.

The public names are imported on first use (PEP 562 module `__getattr__`), so `flame
--version` and `flame --help` do not pay for pydantic or numpy; `from flame import X` and
`flame.X` work as usual.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # what mypy and IDEs see; at run time these load lazily below
    from flame import dp
    from flame.config import FlameConfig, load_config
    from flame.data import Data
    from flame.disclosure import counts
    from flame.errors import (
        AnalysisError,
        AnalysisLoadError,
        ConfigError,
        DataError,
        FlameError,
        MessageError,
        PolicyRefused,
        RunFailed,
        RunTimeout,
        TransportError,
    )
    from flame.federated.context import Context, Received, context
    from flame.federated.records import EpochRecord, Event, RunResult
    from flame.federated.run_store import load_result
    from flame.federated.secure import Results, secure
    from flame.main import run
    from flame.policy import NodePolicy, load_policy
    from flame.simulate import simulate

# public name -> the module that defines it
_LAZY: dict[str, str] = {
    "FlameConfig": "flame.config",
    "load_config": "flame.config",
    "Data": "flame.data",
    "counts": "flame.disclosure",
    "AnalysisError": "flame.errors",
    "PolicyRefused": "flame.errors",
    "NodePolicy": "flame.policy",
    "load_policy": "flame.policy",
    "AnalysisLoadError": "flame.errors",
    "ConfigError": "flame.errors",
    "DataError": "flame.errors",
    "FlameError": "flame.errors",
    "MessageError": "flame.errors",
    "RunFailed": "flame.errors",
    "RunTimeout": "flame.errors",
    "TransportError": "flame.errors",
    "Context": "flame.federated.context",
    "Received": "flame.federated.context",
    "context": "flame.federated.context",
    "EpochRecord": "flame.federated.records",
    "Event": "flame.federated.records",
    "RunResult": "flame.federated.records",
    "load_result": "flame.federated.run_store",
    "Results": "flame.federated.secure",
    "secure": "flame.federated.secure",
    "run": "flame.main",
    "simulate": "flame.simulate",
}


def __getattr__(name: str) -> Any:
    if name == "dp":  # a submodule: flame.dp.laplace(...), flame.dp.gaussian(...)
        return importlib.import_module("flame.dp")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flame' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "dp"})


class _Package(ModuleType):
    """Keeps `flame.simulate` the function when the submodule of that name gets imported.

    Importing `flame.simulate` (the module) sets the package attribute to the module; with
    eager imports `__init__` rebound it to the function afterwards, which lazy loading cannot.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, ModuleType) and _LAZY.get(name) == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "AnalysisError",
    "AnalysisLoadError",
    "NodePolicy",
    "PolicyRefused",
    "counts",
    "dp",
    "load_policy",
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

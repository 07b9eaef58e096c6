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
    from flame.aggregator.records import EpochRecord, Event, RunResult
    from flame.aggregator.run_store import load_result
    from flame.config import FlameConfig, load_config
    from flame.data import Data
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
    from flame.main import run
    from flame.node.context import Context, Received, context
    from flame.privacy.disclosure import counts
    from flame.privacy.policy import NodePolicy, load_policy
    from flame.secure.fields import Results, secure
    from flame.simulate import simulate

# public name -> the module that defines it
_LAZY: dict[str, str] = {
    "FlameConfig": "flame.config",
    "load_config": "flame.config",
    "Data": "flame.data",
    "counts": "flame.privacy.disclosure",
    "AnalysisError": "flame.errors",
    "PolicyRefused": "flame.errors",
    "NodePolicy": "flame.privacy.policy",
    "load_policy": "flame.privacy.policy",
    "AnalysisLoadError": "flame.errors",
    "ConfigError": "flame.errors",
    "DataError": "flame.errors",
    "FlameError": "flame.errors",
    "MessageError": "flame.errors",
    "RunFailed": "flame.errors",
    "RunTimeout": "flame.errors",
    "TransportError": "flame.errors",
    "Context": "flame.node.context",
    "Received": "flame.node.context",
    "context": "flame.node.context",
    "EpochRecord": "flame.aggregator.records",
    "Event": "flame.aggregator.records",
    "RunResult": "flame.aggregator.records",
    "load_result": "flame.aggregator.run_store",
    "Results": "flame.secure.fields",
    "secure": "flame.secure.fields",
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
    """Keeps `flame.simulate` and `flame.secure` the functions when the submodule or package
    of that name gets imported.

    Importing `flame.simulate` (the module) sets the package attribute to the module; with
    eager imports `__init__` rebound it to the function afterwards, which lazy loading cannot.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, ModuleType) and name in _LAZY:  # flame.simulate, flame.secure
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

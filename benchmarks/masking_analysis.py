"""The analysis `benchmarks/masking_epoch.py` runs in `flame simulate`: a module file, so the
isolated rows (an analysis child per node, as `flame simulate` runs it by default) can import
it. Each node's update is the float64 vector in its data file `update`."""

from __future__ import annotations

from typing import Any

import numpy as np

import flame


def _update(data: Any) -> np.ndarray:
    return np.frombuffer(data.read_bytes("update"), dtype="<f8")


def analyze_masked(data: Any) -> Any:
    return {"update": flame.secure(_update(data))}


def analyze_plain(data: Any) -> Any:
    return {"update": _update(data)}


def aggregate(results: Any) -> Any:
    if getattr(results, "secure", None):
        return results.secure["update"]
    return sum(r["update"] for r in results.values())

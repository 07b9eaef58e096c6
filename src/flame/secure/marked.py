"""`flame.secure(...)` markers and the result trees that carry them.

What `analyze` returns may hold `Secure` markers anywhere in dicts and lists; the node
replaces each with its sealed form, the aggregator collects the sealed fields of every node
(`sealed_fields`), sums them under the run's scheme and hands `aggregate` a `Results` in
which each summed field stands as `Summed` (`strip_sealed`) beside `results.secure`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flame.errors import FlameError
from flame.privacy.markers import register
from flame.wire.envelope import Sealed

__all__ = [
    "Results",
    "Secure",
    "Summed",
    "sealed_fields",
    "secure",
    "strip_sealed",
]


@register("secure")
@dataclass(frozen=True)
class Secure:
    """A value `analyze` wants summed under encryption (see `flame.secure`). Its repr
    leaves the values out: an error that prints the marker must not print what it hides."""

    values: Any = field(repr=False)
    bound: float | None = None
    precision: int | None = None


def secure(values: Any, *, bound: float | None = None, precision: int | None = None) -> Secure:
    """Mark numbers (a scalar, list or numpy array) to be summed without the aggregator
    seeing them: `return {"n": n, "total": flame.secure(x.sum(axis=0))}`.

    `bound` (largest |value|) and `precision` (fractional bits) override the configured
    defaults (FLAME_SECURE__BOUND, FLAME_SECURE__PRECISION) for this field only, so one
    large-magnitude field neither fails at the global bound nor widens every other field's
    slots: `flame.secure((age**2).sum(), bound=1e7)`. With `precision=0` the values are
    summed as exact integers and come back as ints. A scalar comes back as a Python
    float (int with `precision=0`) in `results.secure[...]`, an array as a numpy array.
    Every node must mark a field the same way.
    """
    if bound is not None and (
        isinstance(bound, bool)
        or not isinstance(bound, (int, float, np.integer, np.floating))
        or not (np.isfinite(bound) and bound > 0)
    ):
        raise FlameError(f"flame.secure(bound={bound!r}): the bound must be a positive number")
    if precision is not None and (
        isinstance(precision, bool)
        or not isinstance(precision, (int, np.integer))
        or not 0 <= precision <= 60
    ):
        raise FlameError(
            f"flame.secure(precision={precision!r}): the precision is a number of fractional "
            "bits, an int from 0 to 60"
        )
    return Secure(
        values,
        None if bound is None else float(bound),
        None if precision is None else int(precision),
    )


class Summed:
    """Stands in `results[node][field]` for a securely summed field: only the sum exists."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"<securely summed: see results.secure[{self.path!r}]>"


class Results(dict[str, Any]):
    """`{node id: result}` for `aggregate`, plus the securely summed fields."""

    def __init__(
        self,
        results: dict[str, Any],
        secure: dict[str, Any] | None = None,
        contributors: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__(results)
        self.secure: dict[str, Any] = dict(secure or {})
        self.contributors: dict[str, list[str]] = dict(contributors or {})


def _walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")


def _replace(value: Any, change: Any, path: str = "") -> Any:
    replaced = change(path, value)
    if replaced is not value:
        return replaced
    if isinstance(value, dict):
        return {k: _replace(v, change, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace(v, change, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def sealed_fields(results: dict[str, Any]) -> dict[str, dict[str, Sealed]]:
    """{field path: {node: its sealed value}} over every node's result."""
    sealed: dict[str, dict[str, Sealed]] = {}
    for node, result in results.items():
        for path, value in _walk(result):
            if isinstance(value, Sealed):
                sealed.setdefault(path, {})[node] = value
    return sealed


def strip_sealed(results: dict[str, Any]) -> dict[str, Any]:
    """Every node's result with each sealed value replaced by `Summed` (only the sum exists)."""
    return {
        node: _replace(result, lambda p, v: Summed(p) if isinstance(v, Sealed) else v)
        for node, result in results.items()
    }


def _as_floats(sums: np.ndarray) -> np.ndarray:
    if sums.dtype == object:
        return np.array([float(s) for s in sums], dtype=np.float64)
    return sums.astype(np.float64)


def _plain(value: np.ndarray, precision: int) -> Any:
    """A decrypted sum as the analyst wants it: a scalar as a Python number, integers
    (precision 0) as ints."""
    if precision == 0:
        value = np.rint(value).astype(np.int64)
    return value.item() if value.ndim == 0 else value

"""Disclosure control on marked counts: `flame.counts(x)` and the node's small-cell rule.

The analyst marks counts and contingency cells; the node runtime (not the analysis) applies
the operator's `min_cell_count` before anything is encrypted or sent. A suppressed cell
leaves the node as zero plus a mask bit; `aggregate` sees a numpy masked array whose mask
says which cells were suppressed (and `mask.sum()` how many). In refuse mode the epoch
fails with a message naming the field and the rule, never the value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flame.errors import FlameError, PolicyRefused
from flame.privacy.markers import TAG, register

__all__ = ["Counts", "apply_cell_rule", "counts", "reveal_suppressed"]

SUPPRESSED = "suppressed"


@register("counts")
@dataclass(frozen=True)
class Counts:
    """Counts (a scalar or an array of cells) the node's small-cell rule applies to (its
    repr leaves them out: small cells must not reach an error text or a log line)."""

    values: Any = field(repr=False)


def counts(values: Any) -> Counts:
    """Mark counts or contingency-table cells: `return {"table": flame.counts(table)}`.

    The node's policy decides what leaves: cells below `min_cell_count` are suppressed
    (masked) or the epoch is refused. Combine with `flame.secure(flame.counts(x))` to sum
    them encrypted; the rule applies on the node before encryption.
    """
    return Counts(values)


def _cells(values: Any, path: str) -> np.ndarray:
    try:
        cells = np.asarray(values)
    except (TypeError, ValueError):
        cells = np.asarray([], dtype=object)
    if cells.dtype.kind not in "biuf":
        raise FlameError(f"flame.counts at {path or 'the top'!r} must hold numbers")
    return cells


def apply_cell_rule(
    values: Any,
    *,
    path: str,
    min_count: int | None,
    mode: str,
    zero_is_small: bool,
    encrypted: bool,
) -> tuple[Any, int]:
    """The releasable form of marked counts and how many cells were suppressed."""
    if min_count is None:
        return values, 0
    cells = _cells(values, path)
    # NaN and infinities are no count: small (a NaN compares False, its payload bits passed)
    small = np.asarray(~(np.isfinite(cells) & (cells >= min_count)))  # 0-d for a scalar
    if not zero_is_small:
        small = np.asarray(small & np.asarray(cells != 0))
    hidden = int(np.count_nonzero(small))
    if hidden and mode == "refuse":
        raise PolicyRefused(
            f"field {path or 'value'!r}: {hidden} cell(s) below the node's min_cell_count = "
            f"{min_count} (rule: on_small_cell = refuse)"
        )
    if not hidden:
        return values, 0
    if encrypted:  # inside flame.secure: zeros join the encrypted sum, counted in the status
        zeroed = np.where(small, 0, cells).astype(cells.dtype)
        return (zeroed.item() if zeroed.ndim == 0 else zeroed), hidden
    zeroed = np.asarray(np.where(small, 0, cells).astype(cells.dtype))
    return {TAG: SUPPRESSED, "values": zeroed, "mask": small}, hidden


RELEASE = "release"


def wrap_release(body: Any, report: dict[str, Any]) -> Any:
    """A result body with the node's privacy report (DP spend, suppressed cells) attached,
    so the aggregator can record it per epoch in the run's history and manifest."""
    return {TAG: RELEASE, "result": body, "privacy": report}


def unwrap_release(body: Any) -> tuple[Any, dict[str, Any] | None]:
    """(result body, privacy report or None) of what a node sent."""
    if isinstance(body, dict) and body.get(TAG) == RELEASE and set(body) == {
        TAG,
        "result",
        "privacy",
    }:
        report = body["privacy"]
        return body["result"], report if isinstance(report, dict) else None
    return body, None


def reveal_suppressed(value: Any) -> Any:
    """On the aggregator: suppressed cells from the wire as numpy masked arrays."""
    if isinstance(value, dict):
        if value.get(TAG) == SUPPRESSED and set(value) == {TAG, "values", "mask"}:
            values, mask = value["values"], value["mask"]
            if isinstance(mask, bool):  # a scalar cell's mask may arrive as a plain bool
                mask = np.asarray(mask)
            if (
                isinstance(values, np.ndarray)
                and isinstance(mask, np.ndarray)
                and mask.dtype == np.bool_
                and mask.shape == values.shape
            ):
                return np.ma.MaskedArray(values, mask=mask)
            return None
        return {k: reveal_suppressed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [reveal_suppressed(v) for v in value]
    return value

"""Say so when a final result is less than it looks: unconverged, or holding NaN / inf.

A run whose analysis defines `converged` but stops at the epoch limit without converging
returns a result all the same (`"converged": false`); a NaN or an infinity in the final
aggregate usually means a node had no valid values. Both are warnings naming what happened,
so neither passes silently as a finished run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

__all__ = ["non_finite_fields", "warn_if_dishonest"]

log = logging.getLogger(__name__)

_MAX_SHOWN = 5


def non_finite_fields(value: Any, path: str = "result") -> Iterator[str]:
    """Paths (`result.age.mean`, `result.coef[2]`) of NaN or infinite numbers in `value`."""
    if isinstance(value, bool):
        return
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            yield f"{path} ({value})"
    elif isinstance(value, np.ndarray):
        if value.dtype.kind in "fc":
            bad = ~np.isfinite(value)
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                where = ",".join(map(str, first))
                yield f"{path}[{where}] ({int(bad.sum())} of {value.size} not finite)"
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from non_finite_fields(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from non_finite_fields(item, f"{path}[{index}]")


def warn_if_dishonest(value: Any, converged: bool, has_criterion: bool, limit: int) -> None:
    """Log a warning for an unconverged stop at the epoch limit and for NaN/inf fields."""
    if has_criterion and not converged:
        log.warning(
            "stopped at the epoch limit of %d epoch(s) without converging "
            '("converged": false); raise it with --epochs / FLAME_EPOCHS',
            limit,
        )
    bad = []
    for field in non_finite_fields(value):
        bad.append(field)
        if len(bad) > _MAX_SHOWN:
            break
    if bad:
        shown = ", ".join(bad[:_MAX_SHOWN]) + (", ..." if len(bad) > _MAX_SHOWN else "")
        log.warning("the final aggregate holds NaN or infinite values: %s", shown)

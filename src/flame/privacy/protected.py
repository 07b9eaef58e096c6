"""The node policy's allow-list, `release = "protected"`: what counts as protected, and how
a refused value is named (by its kind, never by its content).

Protected, under that rule, is a value the node runtime itself makes safe to leave:
* inside a `flame.dp` marker the runtime resolves (`flame.dp.laplace/gaussian` under the
  node's rules, the runtime statistics `flame.dp.sum/mean/count/histogram`): it leaves noised,
  its (ε, δ) charged to the ledger;
* inside `flame.secure(...)`: it leaves only as a Paillier ciphertext or a masked share, and
  the aggregator reads only a sum over the run's contributors.
Not protected on its own: `flame.counts(...)`. The node cannot tell a count from any other
number, and a value at or above `min_cell_count` passes the small-cell rule unchanged, so
`flame.counts(age_of_patient_0)` would carry a record out. Counts pass inside a dp marker or
`flame.secure` (e.g. `flame.secure(flame.counts(cells))`), or as `flame.dp.histogram`.
None and empty dicts and lists carry no value and pass; the structure (keys, positions,
which fields exist) remains the analysis's choice.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flame.wire.tables import is_table

__all__ = ["unprotected"]


def unprotected(value: Any) -> str:
    """What a refused value is, in words that quote nothing of it (not even a class name the
    analysis chose: that could be a record)."""
    if isinstance(value, (bool, np.bool_)):
        return "a bool"
    if isinstance(value, (int, float, complex, np.number)):
        return "a number"
    if isinstance(value, (str, bytes, bytearray)):
        return "a string"
    if isinstance(value, np.ndarray):
        return "an array"
    if is_table(value):
        return "a table"
    return "a value"

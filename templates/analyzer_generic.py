"""The analysis: runs on every data holder's node, next to the data. Edit `analyze`.

flame calls `analyze(data, epoch, previous)` once per epoch on every analysis node:
  data      this node's data: data.files(), data.read_csv(), data.read_bytes(name),
            data.rows(name), data.source("fhir").search("Observation") ...
  epoch     0, 1, 2, ... (one epoch unless FLAME_EPOCHS / --epochs says more)
  previous  the aggregate of the previous epoch (None in epoch 0)
Return what the aggregator may see: dicts, lists, numbers, strings, numpy arrays.
Never return raw records: only what your data-use agreement allows to leave the node.
`flame.context()` gives node_id, a seeded rng, progress, free-form messages and local state.
"""

import numpy as np


def analyze(data, epoch, previous):
    table = data.read_csv()  # all CSV files of this node, as {column: numpy array}
    values = table["value"]
    values = values[~np.isnan(values)]
    return {"count": int(values.size), "sum": float(values.sum())}

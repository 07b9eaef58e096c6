"""Contingency table (sex x age group) with the node's small-cell rule applied.

`flame.counts(...)` marks the cells; each node's policy (`policy.toml` here: cells below 5
are suppressed) is enforced by the node runtime before anything leaves the node. A
suppressed cell arrives in `aggregate` as a masked entry: it is left out of the total and
counted, so the table says how many cells each node held back.
"""

import numpy as np

import flame

AGE_EDGES = np.array([0.0, 40.0, 65.0, 200.0])  # <40, 40-64, 65+
SEXES = (0.0, 1.0)  # 0 = female, 1 = male


def analyze(data, epoch, previous):
    table = data.read_csv()
    sex, age = table["sex"], table["age"]
    cells = np.zeros((len(SEXES), len(AGE_EDGES) - 1), dtype=np.int64)
    for row, code in enumerate(SEXES):
        cells[row], _ = np.histogram(age[sex == code], bins=AGE_EDGES)
    return {"table": flame.counts(cells)}


def aggregate(results, epoch, previous):
    total = np.zeros((len(SEXES), len(AGE_EDGES) - 1), dtype=np.int64)
    suppressed = {}
    for node, result in results.items():
        cells = np.ma.asarray(result["table"])
        total += np.ma.filled(cells, 0).astype(np.int64)
        suppressed[node] = int(np.ma.getmaskarray(cells).sum())
    return {
        "rows": ["female", "male"],
        "columns": ["<40", "40-64", "65+"],
        "table": total,
        "suppressed_cells": suppressed,
    }

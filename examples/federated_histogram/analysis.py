"""Federated histogram: counts per fixed bin, summed over nodes, in one epoch.

Bins are fixed in advance (never derived from one node's data, which would leak its range);
values outside them are counted as underflow / overflow so no value is silently lost.
"""

import numpy as np

COLUMNS = {
    "age": np.linspace(0.0, 100.0, 11),  # 10 bins of 10 years
    "bmi": np.array([0.0, 18.5, 25.0, 30.0, 35.0, 40.0, 100.0]),
}


def analyze(data, epoch, previous):
    table = data.read_csv()
    result = {}
    for column, edges in COLUMNS.items():
        values = table[column]
        values = values[~np.isnan(values)]
        counts, _ = np.histogram(values, bins=edges)
        result[column] = {
            "counts": counts.astype(np.int64),
            "under": int((values < edges[0]).sum()),
            "over": int((values > edges[-1]).sum()),
        }
    return result


def aggregate(results, epoch, previous):
    total = {}
    for node_result in results.values():
        for column, part in node_result.items():
            if column not in total:
                total[column] = {
                    "edges": COLUMNS[column].tolist(),
                    "counts": np.zeros_like(part["counts"]),
                    "under": 0,
                    "over": 0,
                }
            total[column]["counts"] = total[column]["counts"] + part["counts"]
            total[column]["under"] += part["under"]
            total[column]["over"] += part["over"]
    return total

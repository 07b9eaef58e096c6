"""Federated mean and standard deviation of every numeric column, exact, in one epoch.

Each node sends only (count, mean, sum of squared deviations) per column; the aggregator
combines them with Chan et al.'s parallel formula, which is numerically stable, so the result
equals the pooled computation to rounding error.
"""

import numpy as np


def analyze(data, epoch, previous):
    table = data.read_csv()  # every CSV file of this node, stacked
    summary = {}
    for column, values in table.items():
        if values.dtype.kind != "f":
            continue  # text columns are not averaged
        values = values[~np.isnan(values)]
        mean = float(values.mean()) if values.size else 0.0
        summary[column] = {
            "n": int(values.size),
            "mean": mean,
            "m2": float(((values - mean) ** 2).sum()),
        }
    return summary


def aggregate(results, epoch, previous):
    combined = {}
    for summary in results.values():
        for column, part in summary.items():
            if column not in combined:
                combined[column] = dict(part)
                continue
            total = combined[column]
            n = total["n"] + part["n"]
            if n == 0:
                continue
            delta = part["mean"] - total["mean"]
            total["mean"] += delta * part["n"] / n
            total["m2"] += part["m2"] + delta * delta * total["n"] * part["n"] / n
            total["n"] = n
    return {
        column: {
            "n": c["n"],
            "mean": c["mean"],
            "std": float(np.sqrt(c["m2"] / (c["n"] - 1))) if c["n"] > 1 else 0.0,
        }
        for column, c in sorted(combined.items())
    }

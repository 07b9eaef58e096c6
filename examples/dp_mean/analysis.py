"""Differentially private mean age: each node releases a noisy sum and a noisy count.

Ages are clipped to [0, 100], so one person changes a node's sum by at most 100 (the
sensitivity) and its count by 1. The node runtime adds Laplace noise drawn by OpenDP and
charges epsilon 0.5 + 0.5 = 1.0 per run to the node's budget (`policy.toml`: 3.0 in all),
declared up front with `@flame.dp.spends` so an exhausted node refuses before reading data.
"""

import numpy as np

import flame

LOW, HIGH = 0.0, 100.0


@flame.dp.spends(epsilon=1.0)
def analyze(data, epoch, previous):
    age = data.read_csv()["age"]
    age = flame.dp.clip(age[~np.isnan(age)], LOW, HIGH)
    return {
        "sum": flame.dp.laplace(float(age.sum()), sensitivity=HIGH, epsilon=0.5),
        "n": flame.dp.laplace(float(age.size), sensitivity=1.0, epsilon=0.5),
    }


def aggregate(results, epoch, previous):
    total = sum(r["sum"] for r in results.values())
    n = sum(r["n"] for r in results.values())
    return {"mean": total / max(n, 1.0), "n": n}

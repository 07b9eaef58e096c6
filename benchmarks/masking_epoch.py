"""Masked secure sum (flame.protocols.masking) vs a plaintext sum, in one process.

Every party runs in this process and every message goes through its wire bytes (signed
with Ed25519 identities, as in a run with a roster), so the rows time the protocol's whole
round trip: keys, sealed Shamir shares, ChaCha20 masks, consistency signatures, unmasking.
The plaintext row is the same data summed with no protection: each node's float64 vector
to bytes, the server reads and adds them. A Flower SecAgg+ row drives flwr's own client mod
functions and the server workflow's unmask arithmetic in the same way (skipped when flwr is
not importable). Network, broker and process costs are not in those rows; the last table
times whole `flame simulate` epochs (memory broker), plaintext and masking in turn, with
`analyze` in process (the Python API's default) and in an isolated child per node (the
`flame simulate` command's default), the analysis in benchmarks/masking_analysis.py.

    python benchmarks/masking_epoch.py [--quick] [--no-large] [--rounds 7]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # masking_analysis, isolated too
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flame.protocols.masking import Binding, Session, run_local
from flame.protocols.masking.graph import SPARSE_FROM, degree_for
from flame.protocols.paillier import SecureSumSpec

SPEC = SecureSumSpec(precision=16, bound=1024.0, max_nodes=100)


def best_of(repeats: int, work: Callable[[], Any]) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = work()
        best = min(best, time.perf_counter() - start)
    return best, out


def plaintext_sum(values: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
    wire = [np.ascontiguousarray(v, dtype="<f8").tobytes() for v in values.values()]
    total = np.zeros(len(next(iter(values.values()))))
    for data in wire:
        total += np.frombuffer(data, dtype="<f8")
    return total, sum(len(w) for w in wire)


def masking_row(values: dict[str, np.ndarray], threshold: int, drop: dict[str, str]) -> Any:
    nodes = tuple(sorted(values))
    ids = {v: Ed25519PrivateKey.generate() for v in (*nodes, "aggregator")}
    session = Session(Binding("bench", 1, "update"), nodes, threshold, SPEC)
    return run_local(session, values, identities=ids, drop=drop)


def flower_row(values: dict[str, np.ndarray], threshold: int) -> tuple[np.ndarray, int]:
    """flwr 1.42's SecAgg+ client stages (secaggplus_mod) and its server unmask arithmetic."""
    from flwr.common import bytes_to_ndarray, ndarrays_to_parameters

    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_extract,
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    # |values| <= 100 here: clipping at 128 clips nothing; weight 1 of max 1 keeps full scale
    n, clip, q_range, mod_range = len(values), 128.0, 1 << 22, 1 << 32
    nids = {v: i + 1 for i, v in enumerate(sorted(values))}
    states = {}
    pks = {}
    for v, nid in nids.items():
        state = mod.SecAggPlusState()
        state.nid = nid
        cfg = {
            "sample_num": n,
            "share_num": n,
            "threshold": threshold,
            "clipping_range": clip,
            "target_range": q_range,
            "mod_range": mod_range,
            "max_weight": 1.0,
        }
        res = mod._setup(state, cfg)
        pks[str(nid)] = (res["pk1"], res["pk2"])
        states[v] = state
    inbox: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in nids.values()}
    for v, state in states.items():
        res = mod._share_keys(state, dict(pks))
        for dst, ct in zip(res["dsts"], res["ctxts"], strict=True):
            inbox[dst][0].append(nids[v])
            inbox[dst][1].append(ct)
    masked, wire = None, 0
    for v, state in states.items():
        srcs, cts = inbox[nids[v]]
        res = mod._collect_masked_vectors(
            state, {"ctxts": cts, "srcs": srcs}, 1, ndarrays_to_parameters([values[v]])
        )
        blobs = res["masked_params"]
        wire += sum(len(b) for b in blobs)
        vec = [bytes_to_ndarray(b) for b in blobs]
        masked = vec if masked is None else parameters_addition(masked, vec)
    assert masked is not None
    masked = parameters_mod(masked, mod_range)
    shares: dict[int, list[bytes]] = {nid: [] for nid in nids.values()}
    for state in states.values():
        res = mod._unmask(state, {"active_nids": list(nids.values()), "dead_nids": []})
        for owner, share in zip(res["nids"], res["shares"], strict=True):
            shares[owner].append(share)
    for share_list in shares.values():
        seed = combine_shares(share_list)
        mask = pseudo_rand_gen(seed, mod_range, get_parameters_shape(masked))
        masked = parameters_subtraction(masked, mask)
    recon = parameters_mod(masked, mod_range)
    q_total, recon = factor_extract(recon)
    out = dequantize(recon, clip, q_range)[0] - (n - 1) * clip
    return out * (q_range / q_total) * n, wire  # Flower returns the mean; times n: the sum


def simulate_rows(shapes: list[tuple[int, int]], rounds: int) -> None:
    """Whole `flame simulate` epochs over the memory broker: plaintext vs masking, in turn
    (medians of `rounds` pairs, after a warm-up pair), with analyze in process and in an
    isolated child per node (the CLI's default)."""
    import masking_analysis as analysis

    import flame
    from flame.config import load_config
    from flame.testing import MemoryBroker, memory_data
    from flame.wire.envelope import encode_parts

    print()
    print(
        f"flame simulate, one epoch (memory broker; median of {rounds} plaintext/masking pairs "
        "run in turn after a warm-up pair; CPU: this process's, without the isolated children's)"
    )
    print(
        "| nodes x values | analyze | plaintext epoch s (CPU) | masking epoch s (CPU) | ratio "
        "(median of pairs) | wire B/value, plaintext | masking |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")

    def cpu() -> float:
        return time.process_time()

    for nodes, size in shapes:
        rng = np.random.default_rng(2)
        data = {
            f"node{i:03d}": memory_data(
                {"update": rng.uniform(-100, 100, size).astype("<f8").tobytes()}, f"node{i:03d}"
            )
            for i in range(nodes)
        }
        for isolate in (False, True):
            wire = [0]

            def count(envelope: Any, wire: list[int] = wire) -> bool:
                if envelope.kind in ("result", "message"):
                    wire[0] += sum(len(p) for p in encode_parts(envelope))
                return True

            def epoch(
                secure: bool,
                isolate: bool = isolate,
                data: dict[str, Any] = data,
                wire: list[int] = wire,
                count: Callable[[Any], bool] = count,
            ) -> tuple[float, float, int, Any]:
                settings = {"enabled": secure, "scheme": "masking", "bound": 1024.0}
                config = load_config(secure=settings, epoch_timeout=600)
                wire[0] = 0
                started, cpu_started = time.perf_counter(), cpu()
                out = flame.simulate(
                    analysis.analyze_masked if secure else analysis.analyze_plain,
                    analysis.aggregate,
                    data=data,
                    config=config,
                    broker=MemoryBroker(on_send=count),
                    isolate=isolate,
                )
                return time.perf_counter() - started, cpu() - cpu_started, wire[0], out.value

            epoch(False), epoch(True)  # warm-up: imports, threads, isolated children
            plain, masked = [], []
            for _ in range(rounds):
                plain.append(epoch(False))
                masked.append(epoch(True))
            err = float(np.abs(plain[-1][3] - masked[-1][3]).max())
            assert err <= SPEC.max_error(nodes) + 1e-6, err
            ratio = statistics.median(m[0] / p[0] for p, m in zip(plain, masked, strict=True))
            p_s, p_cpu = (statistics.median(x[i] for x in plain) for i in (0, 1))
            m_s, m_cpu = (statistics.median(x[i] for x in masked) for i in (0, 1))
            print(
                f"| {nodes} x {size:,} | {'isolated child' if isolate else 'in process'} "
                f"| {p_s:.3f} ({p_cpu:.3f}) | {m_s:.3f} ({m_cpu:.3f}) | {ratio:.2f}x "
                f"| {plain[-1][2] / (nodes * size):.2f} | {masked[-1][2] / (nodes * size):.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10 x 10,000 and 10 x 100,000 only")
    parser.add_argument("--no-large", action="store_true", help="skip 100 nodes x 100,000")
    parser.add_argument("--rounds", type=int, default=7, help="simulate pairs per row")
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    shapes = [(10, 10_000), (10, 100_000)] if args.quick else [(10, 100_000), (10, 1_000_000)]
    have_flwr = importlib.util.find_spec("flwr") is not None
    print("masked secure sum, all parties in one process (signed messages, wire bytes)")
    print(
        "| nodes x values | plaintext s | masking s | ratio | masking B/value (masked input) "
        "| plaintext B/value | Flower SecAgg+ s | masking vs Flower |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for nodes, size in shapes:
        values = {f"node{i:03d}": rng.uniform(-100, 100, size) for i in range(nodes)}
        threshold = nodes // 2 + 1
        plain_s, (plain, plain_bytes) = best_of(3, partial(plaintext_sum, values))
        mask_s, run = best_of(2, partial(masking_row, values, threshold, {}))
        err = float(np.abs(run.result.values() - plain).max())
        assert err <= SPEC.max_error(nodes) + 1e-6, err
        count = nodes * size
        mask_b = (run.bytes_up + run.bytes_down) / count
        flower = "skipped (flwr not importable)"
        versus = ""
        if have_flwr:
            flower_s, (fsum, _) = best_of(1, partial(flower_row, values, threshold))
            flower = f"{flower_s:.2f} (max err {float(np.abs(fsum - plain).max()):.1e})"
            versus = f"{flower_s / mask_s:.1f}x faster"
        print(
            f"| {nodes} x {size:,} | {plain_s:.3f} | {mask_s:.2f} | {mask_s / plain_s:.0f}x | "
            f"{mask_b:.2f} ({run.by_round['masked'] / count:.2f}) | {plain_bytes / count:.2f} | "
            f"{flower} | {versus} |"
        )
    simulate_rows(shapes, args.rounds)
    if not (args.quick or args.no_large):
        nodes, size = 100, 100_000
        values = {f"node{i:03d}": rng.uniform(-100, 100, size) for i in range(nodes)}
        drop = {f"node{i:03d}": "masked" for i in range(0, nodes, 10)}  # 10 % after sharing keys
        start = time.perf_counter()
        run = masking_row(values, nodes // 2 + 1, drop)
        seconds = time.perf_counter() - start
        survivors = [v for v in values if v not in drop]
        exact = sum(np.rint(values[v] * SPEC.scale).astype(np.int64) for v in survivors)
        ok = np.array_equal(run.result.encoded, exact)
        graph = degree_for(nodes) if nodes >= SPARSE_FROM else None
        shape = f"sparse graph, k = {graph[0]}, t_k = {graph[1]}" if graph else "complete graph"
        print(
            f"100 nodes x 100,000 values ({shape}), 10 dropping after sharing keys: "
            f"{seconds:.1f} s, "
            f"survivors' exact sum: {'yes' if ok else 'NO'} ({len(run.result.contributors)} "
            f"contributors), {(run.bytes_up + run.bytes_down) / (nodes * size):.2f} B/value"
        )


if __name__ == "__main__":
    main()

"""Masked secure sum (flame.protocols.masking) vs a plaintext sum, in one process.

Every party runs in this process and every message goes through its wire bytes (signed
with Ed25519 identities, as in a run with a roster), so the rows time the protocol's whole
round trip: keys, sealed Shamir shares, ChaCha20 masks, consistency signatures, unmasking.
The plaintext row is the same data summed with no protection: each node's float64 vector
to bytes, the server reads and adds them. A Flower SecAgg+ row drives flwr's own client mod
functions and the server workflow's unmask arithmetic in the same way (skipped when flwr is
not importable). Network, broker and process costs are not in any row: see
benchmarks/secure_epoch.py for whole `flame simulate` epochs.

    python benchmarks/masking_epoch.py [--quick] [--no-large]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
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


def simulate_rows(shapes: list[tuple[int, int]]) -> None:
    """Whole `flame simulate` epochs over the memory broker: plaintext vs masking."""
    import flame
    from flame.config import load_config
    from flame.testing import MemoryBroker, memory_data
    from flame.wire.envelope import encode_parts

    print()
    print(
        "flame simulate, one epoch (memory broker, every node a thread of this process; "
        "best of 2 after a warm-up run)"
    )
    print(
        "| nodes x values | plaintext epoch s | masking epoch s | ratio | wire B/value, "
        "plaintext | masking |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for nodes, size in shapes:
        rng = np.random.default_rng(2)
        updates = {f"node{i:03d}": rng.uniform(-100, 100, size) for i in range(nodes)}
        data = {node: memory_data({"x": b"1"}, node) for node in updates}

        def analyze(data: Any, updates: Any = updates) -> Any:
            return {"update": flame.secure(updates[data.node_id])}

        def analyze_plain(data: Any, updates: Any = updates) -> Any:
            return {"update": updates[data.node_id]}

        def aggregate(results: Any) -> Any:
            if getattr(results, "secure", None):
                return results.secure["update"]
            return sum(r["update"] for r in results.values())

        warm = {node: data[node] for node in list(data)[:2]}  # imports, first threads
        flame.simulate(analyze_plain, aggregate, data=warm, epochs=1)
        row = []
        for secure in (False, True):
            wire = [0]

            def count(envelope: Any, wire: list[int] = wire) -> bool:
                if envelope.kind in ("result", "message"):
                    wire[0] += sum(len(p) for p in encode_parts(envelope))
                return True

            settings = {"enabled": secure, "scheme": "masking", "bound": 1024.0}
            config = load_config(secure=settings, epoch_timeout=600)
            best = float("inf")
            for _ in range(2):
                wire[0] = 0
                start = time.perf_counter()
                out = flame.simulate(
                    analyze if secure else analyze_plain,
                    aggregate,
                    data=data,
                    config=config,
                    broker=MemoryBroker(on_send=count),
                )
                best = min(best, time.perf_counter() - start)
            row.append((best, wire[0] / (nodes * size), out.value))
        (plain_s, plain_b, plain_v), (mask_s, mask_b, mask_v) = row
        assert float(np.abs(plain_v - mask_v).max()) <= SPEC.max_error(nodes) + 1e-6
        print(
            f"| {nodes} x {size:,} | {plain_s:.2f} | {mask_s:.2f} | {mask_s / plain_s:.2f}x "
            f"| {plain_b:.2f} | {mask_b:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10 x 10,000 and 10 x 100,000 only")
    parser.add_argument("--no-large", action="store_true", help="skip 100 nodes x 100,000")
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
    simulate_rows(shapes)
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

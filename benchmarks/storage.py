"""Storage and data-API throughput: flame's paths against the raw client in the same run.

    python benchmarks/storage.py [--quick]

* Storage: put + get of a numpy update (100 MB; 20 MB with --quick) through `MinioStore`
  (SHA-256 on write and verified read) versus raw `minio` put_object / get_object, against a
  moto S3 server this script starts. Each path runs in its own child process so its peak RSS
  (above the interpreter's baseline after imports) can be measured; the payload array is
  dropped after the put in both paths, as a sender and a receiver would hold it.
* FHIR: resources/s over 10,000 Observations in pages of 100 (2,000 with --quick), through
  `FhirSource.search` versus a raw httpx loop over the same `next` links, against the test
  FHIR server running in a separate process.

Targets: storage throughput >= 0.7x raw, peak RSS <= 2x payload, FHIR >= 0.8x raw.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

ACCESS, SECRET, REGION = "bench-access", "bench-secret-key", "us-east-1"
TOKEN = "flame-test-token"
MB = 1024 * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so import-time spikes do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _peak_kb() -> int:
    return _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ----------------------------------------------------------------------------- children


def child(path: str, endpoint: str, bucket: str, size: int) -> dict[str, Any]:
    """Runs in its own process: one put + get of `size` bytes through `path`."""
    import io

    import numpy as np
    from minio import Minio

    from flame.clients.minio_client import MinioStore
    from flame.config import StorageSettings

    key = f"bench/{path}.bin"
    if path == "flame":
        store = MinioStore.from_settings(
            StorageSettings(
                endpoint=endpoint,
                bucket=bucket,
                access_key=ACCESS,
                secret_key=SECRET,
                secure=False,
                region=REGION,
                timeout=120.0,
            )
        )
    else:
        raw = Minio(endpoint, access_key=ACCESS, secret_key=SECRET, secure=False, region=REGION)
    baseline = _status_kb("VmRSS")
    _reset_peak()

    update = np.random.default_rng(1).standard_normal(size // 8)
    expected = hashlib.sha256(update.data).hexdigest()
    started = time.perf_counter()
    if path == "flame":
        store.put_bytes(key, update)  # the array's buffer, no copy
        del update
        put_s = time.perf_counter() - started
        started = time.perf_counter()
        data = store.get_bytes(key)  # verified against the stored SHA-256
    else:
        payload = update.tobytes()
        del update
        raw.put_object(bucket, key, io.BytesIO(payload), len(payload))
        del payload
        put_s = time.perf_counter() - started
        started = time.perf_counter()
        response = raw.get_object(bucket, key)
        try:
            data = response.read()
        finally:
            response.close()
            response.release_conn()
    back = np.frombuffer(data, dtype=np.float64)
    get_s = time.perf_counter() - started
    assert hashlib.sha256(back.data).hexdigest() == expected, "round trip changed the data"
    peak = _peak_kb()
    return {"put_s": put_s, "get_s": get_s, "peak_over_baseline": (peak - baseline) * 1024}


def run_child(path: str, endpoint: str, bucket: str, size: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            path,
            "--endpoint",
            endpoint,
            "--bucket",
            bucket,
            "--size",
            str(size),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ benches


def bench_storage(size: int, rounds: int) -> dict[str, dict[str, float]]:
    from servers.s3_server import S3Server

    from flame.clients.minio_client import MinioStore
    from flame.config import StorageSettings

    results: dict[str, dict[str, float]] = {}
    with S3Server() as server:
        bucket = "flame-bench"
        MinioStore.from_settings(
            StorageSettings(
                endpoint=server.endpoint,
                bucket=bucket,
                access_key=ACCESS,
                secret_key=SECRET,
                secure=False,
                region=REGION,
            )
        ).ensure_bucket()
        for _ in range(rounds):
            for path in ("raw", "flame"):  # interleaved so drift hits both alike
                got = run_child(path, server.endpoint, bucket, size)
                best = results.setdefault(path, {"seconds": float("inf"), "peak": 0.0})
                best["seconds"] = min(best["seconds"], got["put_s"] + got["get_s"])
                best["peak"] = max(best["peak"], got["peak_over_baseline"])
                server.client().remove_object(bucket, f"bench/{path}.bin")
    return results


def bench_fhir(total: int, page: int, rounds: int) -> dict[str, float]:
    import httpx

    from flame.clients.data_api_client import FhirSource
    from flame.clients.token import TokenSource
    from flame.config import TokenSettings

    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "servers" / "fhir_server.py"),
            "--observations",
            str(total),
            "--token",
            TOKEN,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().strip() + "/fhir"

        def flame_pass() -> int:
            tokens = TokenSource(TokenSettings(token=TOKEN), "bench")
            with FhirSource("bench", base, tokens, page_size=page) as source:
                return sum(1 for _ in source.search("Observation"))

        def raw_pass() -> int:
            count = 0
            with httpx.Client(timeout=30.0) as client:
                url: str | None = f"{base}/Observation?_count={page}"
                while url:
                    bundle = client.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).json()
                    count += len(bundle.get("entry", []))
                    url = next(
                        (
                            link["url"]
                            for link in bundle.get("link", [])
                            if link["relation"] == "next"
                        ),
                        None,
                    )
            return count

        best = {"flame": float("inf"), "raw": float("inf")}
        raw_pass()  # warm-up (server-side JSON caches, imports)
        for _ in range(rounds):
            for name, run in (("raw", raw_pass), ("flame", flame_pass)):
                started = time.perf_counter()
                assert run() == total
                best[name] = min(best[name], time.perf_counter() - started)
        return {name: total / seconds for name, seconds in best.items()}
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--endpoint")
    parser.add_argument("--bucket")
    parser.add_argument("--size", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.endpoint, args.bucket, args.size)))
        return

    size = (20 if args.quick else 100) * MB
    total = 2_000 if args.quick else 10_000
    rounds = 2 if args.quick else 3
    storage = bench_storage(size, rounds)
    fhir = bench_fhir(total, 100, rounds + 2)  # a pass is short; more rounds, less noise

    def mbps(path: str) -> float:
        return 2 * size / MB / storage[path]["seconds"]

    store_ratio = mbps("flame") / mbps("raw")
    fhir_ratio = fhir["flame"] / fhir["raw"]
    flame_rss = storage["flame"]["peak"] / size
    raw_rss = storage["raw"]["peak"] / size
    print(f"payload {size // MB} MB, FHIR {total} resources in pages of 100, best of {rounds}\n")
    # minio keeps up to ~4 parts of 5 MiB in flight: a fixed ~20 MiB that dominates small
    # payloads, so the RSS target is judged on the full 100 MB run only.
    rss_verdict = "ok" if flame_rss <= 2 else "MISSED"
    if args.quick:
        rss_verdict = "(judged at 100 MB)"
    print("| benchmark | flame | raw client | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| S3 put+get {size // MB} MB (MB/s) | {mbps('flame'):.1f} | {mbps('raw'):.1f} "
        f"| {store_ratio:.2f}x | >= 0.7x {'ok' if store_ratio >= 0.7 else 'MISSED'} |"
    )
    print(f"| S3 peak RSS / payload | {flame_rss:.2f}x | {raw_rss:.2f}x | | <= 2x {rss_verdict} |")
    print(
        f"| FHIR paging (resources/s) | {fhir['flame']:,.0f} | {fhir['raw']:,.0f} "
        f"| {fhir_ratio:.2f}x | >= 0.8x {'ok' if fhir_ratio >= 0.8 else 'MISSED'} |"
    )


if __name__ == "__main__":
    main()

"""An aggregator killed after epoch 2 of 4 and restarted resumes from its checkpoint in S3:
epochs 0-1 are not recomputed and the final result equals an uninterrupted run.

Real parts: separate `flame run` processes, a real MQTT broker, a real S3 server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from broker import Broker
from nodes import federation_env, flame_process, node_env
from servers.s3_server import S3Server

import flame
import flame.main
from flame.analysis.loader import load_analysis
from flame.clients.minio_client import MinioStore
from flame.clients.object_store import AnalysisLayout
from flame.config import StorageSettings
from flame.wire.envelope import unpack

ANALYSIS = """
import json, os, time
import numpy as np

def analyze(data, epoch, previous):
    time.sleep(0.4)  # long enough to kill the aggregator between epochs
    x = data.read_csv()["x"]
    w = 0.0 if previous is None else previous["w"]
    return {"grad": float(np.sum(x - w)), "n": int(x.size)}

def aggregate(results, epoch, previous):
    with open(os.environ["AGGREGATE_LOG"], "a") as log:
        log.write(json.dumps({"pid": os.getpid(), "epoch": epoch}) + "\\n")
    w = 0.0 if previous is None else previous["w"]
    n = sum(r["n"] for r in results.values())
    return {"w": w + 0.5 * sum(r["grad"] for r in results.values()) / n, "epoch": epoch}
"""

NODES = {"node-0": "x\n1\n2\n3\n", "node-1": "x\n10\n20\n"}


def resume_env(broker: Broker, s3: S3Server, bucket: str, node: str, tmp: Path) -> dict[str, str]:
    env = federation_env(
        broker,
        "resume-test",
        NODES,
        epochs=4,
        storage=s3.settings(bucket=bucket),
        AGGREGATE_LOG=str(tmp / "aggregate.log"),
    )
    return node_env(env, node, data_dir=None if node == "aggregator" else tmp / "data" / node)


def start(env: dict[str, str], tmp: Path, name: str) -> subprocess.Popen[str]:
    return flame_process(["run", str(tmp / "analysis")], env, log=tmp / f"{name}.log")


def test_killed_aggregator_resumes_from_its_checkpoint(
    fresh_broker: Broker, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "analysis.py").write_text(ANALYSIS)
    for node, text in NODES.items():
        (tmp_path / "data" / node).mkdir(parents=True)
        (tmp_path / "data" / node / "x.csv").write_text(text)

    envs = {
        n: resume_env(fresh_broker, s3_server, s3_bucket, n, tmp_path)
        for n in [*NODES, "aggregator"]
    }
    store = MinioStore.from_settings(StorageSettings(**s3_server.settings(bucket=s3_bucket)))
    store.ensure_bucket()
    layout = AnalysisLayout("resume-test")
    nodes = [start(envs[n], tmp_path, n) for n in NODES]
    aggregator = start(envs["aggregator"], tmp_path, "aggregator-1")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and layout.latest_checkpoint(store) != 1:
            assert aggregator.poll() is None, (tmp_path / "aggregator-1.log").read_text()
            time.sleep(0.05)
        assert layout.latest_checkpoint(store) == 1, "epochs 0 and 1 never completed"
        aggregator.send_signal(signal.SIGKILL)
        aggregator.wait(timeout=10)
        restarted = start(envs["aggregator"], tmp_path, "aggregator-2")
        assert restarted.wait(timeout=120) == 0, (tmp_path / "aggregator-2.log").read_text()
        for node, process in zip(NODES, nodes, strict=True):
            assert process.wait(timeout=60) == 0, (tmp_path / f"{node}.log").read_text()
    finally:
        for process in [*nodes, aggregator]:
            if process.poll() is None:
                process.kill()

    calls = [json.loads(line) for line in (tmp_path / "aggregate.log").read_text().splitlines()]
    second = [c["epoch"] for c in calls if c["pid"] == restarted.pid]
    first = [c["epoch"] for c in calls if c["pid"] == aggregator.pid]
    assert first == [0, 1], calls
    assert second == [2, 3], calls  # epochs 0-1 were not recomputed

    resumed = unpack(store.get_bytes(layout.final_result()))
    analysis = load_analysis(tmp_path / "analysis")
    os.environ["AGGREGATE_LOG"] = str(tmp_path / "reference.log")
    try:
        reference = flame.simulate(
            analysis.functions.analyze,
            analysis.functions.aggregate,
            data=tmp_path / "data",
            epochs=4,
        )
    finally:
        del os.environ["AGGREGATE_LOG"]
    assert resumed == reference.value
    manifest = store.get_json(layout.manifest())
    assert [h["epoch"] for h in manifest["history"]] == [0, 1, 2, 3]
    assert manifest["result"]["sha256"]
    assert manifest["code_sha256"] == flame.main.code_hash(analysis.functions)
    assert manifest["participants"] == list(NODES)
    assert manifest["config"]["epochs"] == 4
    text = json.dumps(manifest)
    for secret in (fresh_broker.password, s3_server.settings()["secret_key"]):
        assert secret not in text

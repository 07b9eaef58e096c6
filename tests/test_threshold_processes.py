"""Threshold decryption with real processes over a real Mosquitto: five `flame run` analysis
nodes with roster identities hold shares of a 2048-bit key dealt by `flame keys generate
--threshold 3 --roster`; two of them are SIGKILLed while they decrypt, and the run still
finishes with the correct sums, every contribution signed and checked by the holders."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from broker import Broker, say
from identities import federation

from flame.cli.keys import keys_cli

NODES = [f"node-{i}" for i in range(1, 6)]
SIZE = 1500  # enough ciphertexts that a partial decryption takes a few seconds

ANALYSIS = textwrap.dedent(
    f"""
    import numpy as np
    import flame

    def analyze(data, epoch, previous):
        seed = int(data.read_text("seed.txt"))
        x = np.random.default_rng(seed).uniform(-100, 100, {SIZE})
        return {{"total": flame.secure(x, bound=128)}}

    def aggregate(results, epoch, previous):
        return {{"total": [float(v) for v in results.secure["total"]],
                 "who": results.contributors["total"]}}
    """
)


def _pump(stream, lines: queue.Queue[str], keep: list[str]) -> None:
    for line in stream:
        keep.append(line)
        lines.put(line)


def test_two_share_holders_sigkilled_mid_decryption(
    mqtt_broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    identities = federation(tmp_path / "federation", NODES)  # roster + Ed25519 keys
    keys = tmp_path / "keys"
    roster = identities["aggregator"]["FLAME_ROSTER"]
    dealt = ["generate", "--threshold", "3", "--roster", roster, "--out", str(keys)]
    assert keys_cli(dealt) == 0  # the production key path: one share per analysis node
    (tmp_path / "analysis.py").write_text(ANALYSIS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAME_")}
    env.update(
        {
            "FLAME_ANALYSIS_ID": f"threshold-{os.getpid()}",
            "FLAME_PARTICIPANTS": ",".join(NODES),
            "FLAME_BROKER__URL": mqtt_broker.url,
            "FLAME_BROKER__TOKEN": mqtt_broker.password,
            "FLAME_PRESENCE_TIMEOUT": "120",
            "FLAME_EPOCH_TIMEOUT": "120",
            "FLAME_SECURE__ENABLED": "true",
            "FLAME_SECURE__MIN_CONTRIBUTORS": "3",
        }
    )
    processes: dict[str, subprocess.Popen[str]] = {}

    def start(node: str, extra: dict[str, str]) -> None:
        processes[node] = subprocess.Popen(
            [sys.executable, "-m", "flame", "run", str(tmp_path / "analysis.py")],
            env={**env, "FLAME_NODE_ID": node, **identities[node], **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )

    for index, node in enumerate(NODES):
        data = tmp_path / "data" / node
        data.mkdir(parents=True)
        (data / "seed.txt").write_text(str(index))
        start(
            node,
            {
                "FLAME_ROLE": "analysis",
                "FLAME_DATA_DIR": str(data),
                "FLAME_SECURE__KEY_SHARE_FILE": str(keys / f"share-{node}.json"),
            },
        )
    start(
        "aggregator",
        {
            "FLAME_ROLE": "aggregation",
            "FLAME_SECURE__PUBLIC_KEY_FILE": str(keys / "public_key.json"),
        },
    )
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []
    pump = threading.Thread(
        target=_pump, args=(processes["aggregator"].stderr, lines, log), daemon=True
    )
    pump.start()
    killed = ["node-2", "node-4"]
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if "share holders to decrypt" in line:
                break
            stopped = [n for n, p in processes.items() if p.poll() is not None]
            assert not stopped and time.monotonic() < deadline, (
                f"stopped: {stopped}\n"
                + "".join(log)[-3000:]
                + "".join(
                    p.stderr.read()[-2000:]
                    for n, p in processes.items()
                    if n in stopped and n != "aggregator" and p.stderr
                )
            )
        for node in killed:  # they have the request and are computing their partials
            processes[node].send_signal(signal.SIGKILL)
        stdout: list[str] = []
        out_pump = threading.Thread(
            target=_pump, args=(processes["aggregator"].stdout, queue.Queue(), stdout), daemon=True
        )
        out_pump.start()
        processes["aggregator"].wait(timeout=240)
        pump.join(10)
        out_pump.join(10)
        out = "".join(stdout)
        assert processes["aggregator"].returncode == 0, "".join(log)[-4000:]
        value = json.loads(out.strip().splitlines()[-1])
        expected = np.sum(
            [np.random.default_rng(i).uniform(-100, 100, SIZE) for i in range(len(NODES))], axis=0
        )
        assert value["who"] == NODES
        assert np.abs(np.array(value["total"]) - expected).max() <= 5 * 2.0**-17
        decrypted_by = next(line for line in log if "decrypted with the partial" in line)
        assert not any(node in decrypted_by for node in killed)
        for node in killed:
            assert processes[node].wait(10) == -signal.SIGKILL
        _, holder_log = processes["node-1"].communicate(timeout=60)
        assert "partial decryption of 'total' over 5 contributions" in holder_log
        assert "without checking" not in holder_log  # contributions were signed and checked
        say(capsys, f"threshold run, 2 of 5 holders SIGKILLed: {decrypted_by.strip()[-80:]}")
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=10)

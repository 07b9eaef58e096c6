"""Distributed runs: every node its own `flame run` process, configured by FLAME_* only,
over a real Mosquitto, compared with `flame simulate` on the same data; and the same run
under faults (the broker SIGKILLed and restarted three times mid-epoch, an analysis node
SIGKILLed mid-epoch and started again).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, say
from nodes import Federation, StatusWatcher, clean_env, federation_env

NODES = ("node-1", "node-2", "node-3")
EPOCHS = 5

ANALYSIS = textwrap.dedent(
    """
    import time

    # Gradient steps towards the pooled mean: each epoch depends on the previous aggregate,
    # so a lost, doubled or stale result changes the final number.

    def _values(data):
        text = data.read_text("values.csv")
        return [float(line) for line in text.splitlines()[1:] if line.strip()]

    def analyze(data, epoch, previous):
        time.sleep(SLOW)
        values = _values(data)
        estimate = 0.0 if previous is None else previous["estimate"]
        return {"n": len(values), "residual": sum(v - estimate for v in values)}

    def aggregate(results, epoch, previous):
        estimate = 0.0 if previous is None else previous["estimate"]
        n = sum(results[node]["n"] for node in sorted(results))
        residual = sum(results[node]["residual"] for node in sorted(results))
        return {"estimate": estimate + 0.5 * residual / n, "epoch": epoch, "nodes": len(results)}
    """
)


def write_analysis(folder: Path, slow: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "analysis.py").write_text(f"SLOW = {slow}\n" + ANALYSIS)
    for index, node in enumerate(NODES):
        data = folder / "data" / node
        data.mkdir(parents=True, exist_ok=True)
        values = [index * 7.5 + i * 1.25 for i in range(5 + 3 * index)]
        (data / "values.csv").write_text("value\n" + "\n".join(f"{v!r}" for v in values) + "\n")
    return folder


@pytest.fixture
def analysis_folder(tmp_path: Path) -> Path:
    return write_analysis(tmp_path / "analysis", slow=0.0)


def simulated(folder: Path, epochs: int = EPOCHS) -> Any:
    """What `flame simulate` says on the same analysis and data."""
    env = clean_env()
    output = folder / "simulated.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flame",
            "simulate",
            str(folder / "analysis.py"),
            "--data",
            str(folder / "data"),
            "--epochs",
            str(epochs),
            "--output",
            str(output),
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(output.read_text())["result"]


@pytest.fixture
def federation_of(tmp_path: Path) -> Iterator[Any]:
    made: list[Federation] = []

    def make(broker: Broker, folder: Path, analysis_id: str) -> Federation:
        env = federation_env(
            broker, analysis_id, NODES, epochs=EPOCHS, presence_timeout=90, epoch_timeout=90
        )
        federation = Federation(
            env, folder / "analysis.py", folder / "data", NODES, tmp_path / f"logs-{analysis_id}"
        )
        made.append(federation)
        return federation

    yield make
    for federation in made:
        federation.close()


def Watcher(broker: Broker, analysis_id: str) -> StatusWatcher:
    return StatusWatcher(broker, analysis_id, ["aggregator", *NODES])


def test_four_flame_run_processes_match_simulate(
    mqtt_broker: Broker,
    analysis_folder: Path,
    federation_of: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    expected = simulated(analysis_folder)
    federation = federation_of(mqtt_broker, analysis_folder, f"run-{os.getpid()}-plain")
    started = time.monotonic()
    federation.start_all()
    values = federation.finish()
    say(
        capsys,
        f"distributed run: 4 processes, {EPOCHS} epochs in {time.monotonic() - started:.1f} s; "
        f"result {values['aggregator']}",
    )
    assert values["aggregator"] == expected
    for node in NODES:
        assert values[node] == expected, f"{node} ended with a different final value"


def test_broker_sigkilled_three_times_mid_epoch_same_result(
    tmp_path: Path, federation_of: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_analysis(tmp_path / "analysis", slow=1.0)
    expected = simulated(folder)
    with Broker(save_every_change=True) as broker:
        if not broker.persistent:
            pytest.skip("amqtt keeps no sessions across a restart")
        analysis_id = f"run-{os.getpid()}-brokerkill"
        watcher = Watcher(broker, analysis_id)
        federation = federation_of(broker, folder, analysis_id)
        try:
            federation.start_all()
            killed_in = []
            for epoch in (1, 2, 3):
                watcher.wait_for("aggregator", "collecting", epoch, timeout=90)
                time.sleep(0.4)  # the nodes are inside analyze() now
                broker.restart(kill=True)
                killed_in.append(epoch)
            values = federation.finish()
        finally:
            watcher.close()
    say(
        capsys,
        f"broker SIGKILLed and restarted {broker.restarts} times (mid-epoch {killed_in}); "
        f"final {values['aggregator']} == simulate {expected}",
    )
    assert broker.restarts == 3
    assert values["aggregator"] == expected
    assert all(values[node] == expected for node in NODES)


def test_analysis_node_sigkilled_mid_epoch_rejoins(
    tmp_path: Path, federation_of: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_analysis(tmp_path / "analysis", slow=1.0)
    expected = simulated(folder)
    with Broker() as broker:
        analysis_id = f"run-{os.getpid()}-nodekill"
        watcher = Watcher(broker, analysis_id)
        federation = federation_of(broker, folder, analysis_id)
        try:
            federation.start_all()
            watcher.wait_for("node-2", "computing", 2, timeout=90)
            federation.kill("node-2")  # inside analyze() of epoch 2
            watcher.wait_for("node-2", "offline", None, timeout=30)  # its last will
            federation.start("node-2")
            watcher.wait_for("node-2", "sent", 2, timeout=60)  # it re-joined and answered
            values = federation.finish()
        finally:
            watcher.close()
    say(capsys, f"analysis node SIGKILLed in epoch 2 and restarted; final {values['aggregator']}")
    assert values["aggregator"] == expected
    assert all(values[node] == expected for node in NODES)

"""The node policy, enforced by the node runtime: small cells, min_rows, epochs, refusals.

The wire test runs the crosstab example as four `flame run` processes on a real broker with
a policy file on each analysis node, records every message the broker carries (a subscriber
on `flame/#` as the broker's admin) and searches the raw bytes for the small cell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from broker import ADMIN, Broker
from identities import federation

import flame
from flame.analysis.loader import load_analysis
from flame.errors import ConfigError, RunFailed
from flame.transport.memory import MemoryBroker

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "crosstab_min_count"
NODES = ("clinic_a", "clinic_b", "clinic_c")
BROKER_IDS = {"node-0": "clinic_a", "node-1": "clinic_b", "node-2": "clinic_c"}  # broker users
# clinic_b's table as it would leave the node unprotected: row-major int64 with a cell of 3
RAW_B = np.array([[3, 11, 7], [6, 9, 5]], dtype=np.int64).tobytes()
SUPPRESSED_B = np.array([[0, 11, 7], [6, 9, 5]], dtype=np.int64).tobytes()


class Recorder:
    """Every payload published under flame/ while it runs (QoS 1, as the broker's admin)."""

    def __init__(self, broker: Broker) -> None:
        self.payloads: list[bytes] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"rec-{os.getpid()}")
        self.client.username_pw_set(ADMIN, broker.password)
        self.client.on_connect = lambda c, *_: c.subscribe("flame/#", qos=1)
        self.client.on_subscribe = lambda *_: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port, keepalive=30)
        self.client.loop_start()
        assert self._ready.wait(10), "recorder did not subscribe"

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        with self._lock:
            self.payloads.append(bytes(message.payload))

    def contains(self, pattern: bytes) -> bool:
        with self._lock:
            return any(pattern in payload for payload in self.payloads)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _run_four_processes(broker: Broker, tmp_path: Path, analysis_id: str, policy: Path | None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAME_")}
    env.update(
        {
            "FLAME_ANALYSIS_ID": analysis_id,
            "FLAME_PARTICIPANTS": ",".join(BROKER_IDS),
            "FLAME_BROKER__URL": broker.url,
            "FLAME_BROKER__TOKEN": broker.password,
            "FLAME_PRESENCE_TIMEOUT": "60",
            "FLAME_EPOCH_TIMEOUT": "60",
        }
    )
    identities = federation(tmp_path / "identities", list(BROKER_IDS))
    processes = {}
    for node in ("aggregator", *BROKER_IDS):
        node_env = {**env, "FLAME_NODE_ID": node, **identities[node]}
        if node == "aggregator":
            node_env["FLAME_ROLE"] = "aggregation"
        else:
            node_env.update(
                {
                    "FLAME_ROLE": "analysis",
                    "FLAME_DATA_DIR": str(EXAMPLE / "data" / BROKER_IDS[node]),
                }
            )
            if policy is not None:
                node_env["FLAME_POLICY"] = str(policy)
        processes[node] = subprocess.Popen(
            [sys.executable, "-m", "flame", "run", str(EXAMPLE)],
            env=node_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    outputs = {}
    try:
        for node, process in processes.items():
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, f"{node}: {err[-2000:]}"
            outputs[node] = json.loads(out.strip().splitlines()[-1])
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=10)
    return outputs["aggregator"]


def test_small_cell_never_on_the_wire_four_processes(mqtt_broker: Broker, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('min_cell_count = 5\non_small_cell = "suppress"\nmin_rows = 10\n')
    recorder = Recorder(mqtt_broker)
    try:
        guarded = _run_four_processes(mqtt_broker, tmp_path, f"xtab-{os.getpid()}", policy)
        time.sleep(0.5)  # the last statuses
        assert not recorder.contains(RAW_B), "clinic_b's cell of 3 was on the wire"
        assert recorder.contains(SUPPRESSED_B)  # the recorder does see the table's bytes
    finally:
        recorder.close()
    assert guarded["suppressed_cells"] == {"node-0": 0, "node-1": 1, "node-2": 0}
    assert guarded["table"][0][0] == 12 + 8  # clinic_b's 3 left out
    # control: without a policy the same bytes do travel, so the search above can find them
    recorder = Recorder(mqtt_broker)
    try:
        plain = _run_four_processes(mqtt_broker, tmp_path, f"xtab-{os.getpid()}-open", None)
        time.sleep(0.5)
        assert recorder.contains(RAW_B)
    finally:
        recorder.close()
    assert plain["table"][0][0] == 12 + 3 + 8


def _crosstab() -> Any:
    return load_analysis(EXAMPLE).functions


def test_aggregate_sees_a_masked_cell_and_how_many(tmp_path: Path) -> None:
    f = _crosstab()
    policy = flame.NodePolicy(min_cell_count=5)
    seen: dict[str, Any] = {}

    def aggregate(results: Any, epoch: int, previous: Any) -> Any:
        seen.update(results)
        return f.aggregate(results, epoch=epoch, previous=previous)

    run = flame.simulate(f.analyze, aggregate, data=EXAMPLE / "data", policy=policy)
    result = run.value
    history = run.history[0].to_dict()["privacy"]  # recorded per epoch, as in the manifest
    assert history == {
        "clinic_b": {"spend": {"epsilon": 0, "delta": 0}, "suppressed": {"table": 1}}
    }
    cells = seen["clinic_b"]["table"]
    assert isinstance(cells, np.ma.MaskedArray)
    assert cells.mask.tolist() == [[True, False, False], [False, False, False]]
    assert int(cells.data[0, 0]) == 0  # the value itself never arrived
    assert not isinstance(seen["clinic_c"]["table"], np.ma.MaskedArray)  # 0 is not small
    assert result["suppressed_cells"]["clinic_b"] == 1


def test_refuse_mode_fails_the_epoch_naming_field_and_rule_not_value() -> None:
    f = _crosstab()
    policy = flame.NodePolicy(min_cell_count=5, on_small_cell="refuse")
    with pytest.raises(RunFailed) as caught:
        flame.simulate(f.analyze, f.aggregate, data=EXAMPLE / "data", policy=policy)
    message = str(caught.value)
    assert "clinic_b" in message and "'table'" in message
    assert "min_cell_count = 5" in message and "on_small_cell = refuse" in message
    assert "3" not in message  # the small value is not in the reason


def test_secure_counts_are_suppressed_before_encryption() -> None:
    def analyze(data: Any) -> Any:
        value = int(data.read_csv()["v"].size)
        return {"n": flame.secure(flame.counts(np.array([value, 7], dtype=np.int64)), precision=0)}

    def aggregate(results: Any) -> Any:
        return results.secure["n"]

    data = {"a": {"x.csv": "v\n1\n2\n3\n"}, "b": {"x.csv": "v\n" + "1\n" * 6}}
    total = flame.simulate(
        analyze, aggregate, data=data, secure=True, policy=flame.NodePolicy(min_cell_count=5)
    ).value
    assert np.asarray(total).tolist() == [6, 14]  # a's 3 became 0 before encryption


MIN_ROWS = """
import flame
def analyze(data):
    return {"n": int(data.read_csv()["v"].size)}
def aggregate(results):
    return sum(r["n"] for r in results.values())
"""


@pytest.mark.parametrize("isolate", [True, False])
def test_min_rows_refuses_two_rows_accepts_ten(tmp_path: Path, isolate: bool) -> None:
    (tmp_path / "minrows.py").write_text(MIN_ROWS)
    f = load_analysis(tmp_path / "minrows.py").functions
    policy = flame.NodePolicy(min_rows=10)
    few = {"n1": {"x.csv": "v\n1\n2\n"}}
    with pytest.raises(RunFailed, match=r"min_rows = 10.*rule: min_rows"):
        flame.simulate(f.analyze, f.aggregate, data=few, policy=policy, isolate=isolate)
    enough = {"n1": {"x.csv": "v\n" + "1\n" * 10}}
    result = flame.simulate(f.analyze, f.aggregate, data=enough, policy=policy, isolate=isolate)
    assert result.value == 10


def test_max_epochs_and_per_node_policy() -> None:
    def analyze(data: Any, epoch: int) -> Any:
        return epoch

    def aggregate(results: Any) -> Any:
        return dict(results)

    data = {"a": {"x.csv": "v\n1\n"}, "b": {"x.csv": "v\n1\n"}}
    policies = {"b": flame.NodePolicy(max_epochs=2)}
    with pytest.raises(RunFailed, match=r"node 'b'.*epoch 2.*max_epochs"):
        flame.simulate(analyze, aggregate, data=data, epochs=3, policy=policies)
    assert flame.simulate(analyze, aggregate, data=data, epochs=2, policy=policies).epochs == 2


def test_policy_file_errors_name_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text('min_cell_count = 0\non_small_cell = "hide"\n')
    with pytest.raises(ConfigError) as caught:
        flame.load_policy(bad)
    text = str(caught.value)
    assert "FLAME_POLICY" in text and "min_cell_count" in text and "on_small_cell" in text
    with pytest.raises(ConfigError, match="unknown_rule"):
        (tmp_path / "p.json").write_text('{"unknown_rule": 1}')
        flame.load_policy(tmp_path / "p.json")


def test_status_records_suppressed_cells_per_epoch() -> None:
    f = _crosstab()
    history: list[tuple[str, dict[str, Any]]] = []

    class Recording(MemoryBroker):
        def set_status(self, analysis_id: str, node_id: str, status: dict[str, Any]) -> None:
            history.append((node_id, dict(status)))
            super().set_status(analysis_id, node_id, status)

    broker = Recording()
    flame.simulate(
        f.analyze,
        f.aggregate,
        data=EXAMPLE / "data",
        broker=broker,
        policy=flame.NodePolicy(min_cell_count=5),
    )
    sent = [s for node, s in history if node == "clinic_b" and s["state"] == "sent"]
    assert sent[0]["privacy"]["0"]["suppressed"] == {"table": 1}
    done = [s for node, s in history if node == "clinic_b" and s["state"] == "done"]
    assert done[0]["privacy"]["0"]["suppressed"] == {"table": 1}  # kept in later statuses
    assert all("privacy" not in s for node, s in history if node == "clinic_a")


def test_flame_check_prints_the_policy(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('min_cell_count = 5\nepsilon_budget = 1.5\nbudget_scope = "cohort"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAME_")}
    env["FLAME_POLICY"] = str(policy)
    env["FLAME_NODE_ID"] = "node-1"
    done = subprocess.run(
        [sys.executable, "-m", "flame", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    line = next(x for x in done.stdout.splitlines() if " policy " in f" {x} ")
    assert line.startswith("ok")
    assert "min_cell_count=5" in line and "epsilon_budget=1.5" in line
    assert "left: epsilon 1.5" in line


def test_counts_of_a_dict_or_pandas_crosstab_apply_per_cell() -> None:
    import pandas as pd

    def analyze(data: Any) -> Any:
        t = data.read_csv()
        table = pd.crosstab(t["sex"], t["group"])
        return {
            "cells": flame.counts({"a": 3, "b": 12}),
            "crosstab": flame.counts(table.to_numpy()),
        }

    seen: dict[str, Any] = {}

    def aggregate(results: Any) -> Any:
        seen.update(results["n1"])
        return None

    rows = "sex,group\n" + "0,1\n" * 3 + "0,2\n" * 6 + "1,1\n" * 7 + "1,2\n" * 2
    flame.simulate(
        analyze, aggregate, data={"n1": {"x.csv": rows}}, policy=flame.NodePolicy(min_cell_count=5)
    )
    got = seen
    assert got["cells"]["b"] == 12 and bool(np.ma.getmaskarray(got["cells"]["a"]))
    assert np.ma.getmaskarray(got["crosstab"]).tolist() == [[True, False], [False, True]]
    assert np.ma.filled(got["crosstab"], -1).tolist() == [[-1, 6], [7, -1]]


def test_cli_policy_per_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flame.cli import main

    strict = tmp_path / "strict.toml"
    strict.write_text('min_cell_count = 9\non_small_cell = "suppress"\n')
    argv = ["simulate", str(EXAMPLE), "--data", str(EXAMPLE / "data"), "--quiet"]
    assert main([*argv, "--policy", f"clinic_c={strict}"]) == 0
    result = json.loads(capsys.readouterr().out)
    # only clinic_c's policy is strict: its 8, 6, 7 and 6 are held back; clinic_b's 3 is sent
    assert result["suppressed_cells"] == {"clinic_a": 0, "clinic_b": 0, "clinic_c": 4}
    assert result["table"][0][0] == 12 + 3
    assert main([*argv, "--policy", str(strict), "--policy", str(strict)]) == 1


def test_share_aggregate_false_node_gets_no_aggregates() -> None:
    sent: list[Any] = []

    def analyze(data: Any, epoch: int, previous: Any) -> Any:
        return {"saw_previous": previous is not None}

    def aggregate(results: Any, epoch: int, previous: Any) -> Any:
        return {"total": 41 + epoch, "saw": {n: r["saw_previous"] for n, r in results.items()}}

    def record(envelope: Any) -> bool:
        if envelope.kind in ("aggregate", "finished"):
            sent.append((envelope.recipient, envelope.kind, envelope.body.get("value")))
        return True

    data = {"a": {"x.csv": "v\n1\n"}, "b": {"x.csv": "v\n1\n"}}
    result = flame.simulate(
        analyze,
        aggregate,
        data=data,
        epochs=2,
        broker=MemoryBroker(on_send=record),
        policy={"b": flame.NodePolicy(share_aggregate=False)},
    )
    assert result.value["saw"] == {"a": True, "b": False}
    to_b = [value for node, _kind, value in sent if node == "b"]
    to_a = [value for node, _kind, value in sent if node == "a"]
    assert to_b and all(value is None for value in to_b)  # withheld by the aggregator
    assert to_a and all(value is not None for value in to_a)

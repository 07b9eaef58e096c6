"""FLAME_SECURE__SCHEME=masking with `flame run`: three analysis nodes and the aggregator as
real processes over Mosquitto, every message signed with the roster identities."""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest
from broker import ADMIN, Broker, have_mosquitto
from nodes import AGGREGATOR, Federation, federation_env

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")

NODES = ["node-0", "node-1", "node-2"]
VALUES = {"node-0": "1.5 2.25", "node-1": "-3.125", "node-2": "10 7 0.5"}

ANALYSIS = """
import numpy as np
import flame

def analyze(data):
    v = np.array([float(x) for x in data.read_text("v.txt").split()])
    moments = flame.secure([v.sum(), (v**2).sum()])
    return {"n": flame.secure(len(v), precision=0), "moments": moments}

def aggregate(results):
    return {"n": results.secure["n"], "moments": results.secure["moments"].tolist(),
            "who": results.contributors["moments"]}
"""


def test_a_masked_run_over_mosquitto_gives_the_pooled_sums(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for node, text in VALUES.items():
        (data / node).mkdir(parents=True)
        (data / node / "v.txt").write_text(text)
    code = tmp_path / "analysis.py"
    code.write_text(textwrap.dedent(ANALYSIS))
    with Broker() as broker:
        env = federation_env(
            broker,
            "masked-run",
            NODES,
            epochs=2,
            presence_timeout=60,
            epoch_timeout=60,
            FLAME_SECURE__ENABLED="true",
            FLAME_SECURE__SCHEME="masking",
        )
        federation = Federation(env, code, data, NODES, tmp_path / "logs")
        try:
            federation.start_all()
            values = federation.finish(timeout=150)
        finally:
            for process in federation.processes.values():
                process.kill()
    pooled = [float(x) for text in VALUES.values() for x in text.split()]
    final = values[AGGREGATOR]
    assert final["n"] == len(pooled)
    assert final["who"] == NODES
    assert final["moments"] == pytest.approx(
        [sum(pooled), sum(x * x for x in pooled)], abs=6 * 2.0**-17
    )
    assert all(values[node] == final for node in NODES)


FIVE = [f"node-{i}" for i in range(5)]
SUM_ANALYSIS = """
import numpy as np
import flame

def analyze(data):
    v = np.array([float(x) for x in data.read_text("v.txt").split()])
    return {"v": flame.secure(v)}

def aggregate(results):
    return {"v": results.secure["v"].tolist(), "who": results.contributors["v"]}
"""


def test_a_node_killed_mid_round_leaves_the_survivors_exact_sum(tmp_path: Path) -> None:
    """Five nodes as processes over Mosquitto (t = 4); node-4 is SIGKILLed the moment its
    answer to the keys round reaches the broker (watched as the broker admin), so it drops
    after sharing its keys. The aggregator learns it from node-4's last will and goes on
    without waiting for the epoch timeout (300 s; the test allows 150 s): the result is the
    exact sum of the nodes it names, node-4's masks removed with the survivors' shares."""
    import threading
    import time

    import paho.mqtt.client as mqtt

    from flame.transport.topics import inbox_topic

    values = {node: [float(i + 1), 0.5 * i, -2.25 * i] for i, node in enumerate(FIVE)}
    data = tmp_path / "data"
    for node, vector in values.items():
        (data / node).mkdir(parents=True)
        (data / node / "v.txt").write_text(" ".join(map(str, vector)))
    code = tmp_path / "analysis.py"
    code.write_text(textwrap.dedent(SUM_ANALYSIS))
    victim, killed_at = FIVE[-1], []
    with Broker() as broker:
        env = federation_env(
            broker,
            "masked-kill",
            FIVE,
            epochs=1,
            presence_timeout=60,
            epoch_timeout=300,
            FLAME_SECURE__ENABLED="true",
            FLAME_SECURE__SCHEME="masking",
        )
        federation = Federation(env, code, data, FIVE, tmp_path / "logs")
        fired = threading.Event()

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            payload = bytes(message.payload)
            if (
                not fired.is_set()
                and f'"sender":"{victim}"'.encode() in payload
                and b'"category":"flame.secure.masked"' in payload
            ):
                fired.set()
                federation.processes[victim].signal(signal.SIGKILL)
                killed_at.append(time.monotonic())

        watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="kill-watch")
        watcher.username_pw_set(ADMIN, broker.password)
        watcher.on_message = on_message
        watcher.connect(broker.host, broker.port, keepalive=30)
        watcher.subscribe(inbox_topic("masked-kill", AGGREGATOR), qos=1)
        watcher.loop_start()
        try:
            federation.start_all()
            aggregator = federation.processes[AGGREGATOR]
            assert aggregator.wait(150) == 0, aggregator.tail()
            finished = time.monotonic()
            final = aggregator.value()
        finally:
            watcher.loop_stop()
            watcher.disconnect()
            for process in federation.processes.values():
                process.kill()
    assert fired.is_set(), "node-4 never answered the keys round"
    took = finished - killed_at[0]
    print(f"\n  node-4 killed after sharing keys; the run finished {took:.1f} s later")
    who = final["who"]
    assert len(who) >= 4 and set(who) <= set(FIVE)
    exact = [sum(values[n][k] for n in who) for k in range(3)]
    assert final["v"] == pytest.approx(exact, abs=len(who) * 2.0**-16)
    assert victim not in who or len(who) == 5  # in U3 only if its masked input made it

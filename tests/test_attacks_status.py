"""Red team: replayed retained statuses on a real Mosquitto.

Statuses are signed and retained on `flame/{analysis}/{node}/status`. The attacker can publish
on the broker (its operator) but holds no identity key: it records genuine signed statuses of
one run and re-publishes them, retained, during the next run of the same analysis id, and
after it. Before statuses were bound to their process and ordered, one replayed status of an
earlier process of node-0 made the aggregator see two processes take turns for node-0 (a fake
split brain: the run aborted), and a replayed status of an earlier aggregator did the same on
the nodes; `flame status` showed whatever was replayed as the run's state.
"""

from __future__ import annotations

import json
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from broker import ADMIN, Broker, have_mosquitto
from nodes import Federation, federation_env

from flame.config import FlameConfig
from flame.identity import Roster, status_signed_by
from flame.ops.status import StatusClient, render_status
from flame.transport.mqtt import status_topic
from flame.transport.status_order import CLOCK_SKEW

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")

NODES = ["node-0", "node-1"]
ANALYSIS = """
import time

def analyze(data):
    time.sleep(%(delay)s)  # the replays land while the nodes compute
    v = [float(x) for x in data.read_text("v.txt").split()]
    return {"sum": sum(v), "n": len(v)}

def aggregate(results):
    return {"sum": sum(r["sum"] for r in results.values()), "nodes": sorted(results)}
"""


def _federation(broker: Broker, folder: Path, analysis: str, delay: float) -> Federation:
    data = folder / "data"
    for node, text in {"node-0": "1 2 3", "node-1": "10 20"}.items():
        (data / node).mkdir(parents=True, exist_ok=True)
        (data / node / "v.txt").write_text(text)
    code = folder / "analysis.py"
    code.write_text(textwrap.dedent(ANALYSIS % {"delay": delay}))
    env = federation_env(broker, analysis, NODES, presence_timeout=90, epoch_timeout=90)
    return Federation(env, code, data, NODES, folder / "logs")


class Spy:
    """The operator's recorder: every status of the analysis, as published."""

    def __init__(self, broker: Broker, analysis: str) -> None:
        self.analysis = analysis
        self.seen: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"spy-{time.time_ns()}"
        )
        self.client.username_pw_set(ADMIN, broker.password)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.subscribe(status_topic(analysis, "+"), qos=1)
        self.client.loop_start()

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        node = str(message.topic).split("/")[2]
        with self.lock:
            self.seen.append((node, bytes(message.payload)))

    def statuses(self, node: str) -> list[dict[str, Any]]:
        with self.lock:
            found = [json.loads(p) for n, p in self.seen if n == node and p]
        return [s for s in found if isinstance(s, dict)]

    def wait_for(self, node: str, state: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for status in self.statuses(node):
                if status.get("state") == state:
                    return status
            time.sleep(0.05)
        raise AssertionError(f"{node} never announced {state!r}")

    def replay(self, node: str, status: dict[str, Any]) -> None:
        """Publish a recorded status again, retained, exactly as it was signed."""
        payload = json.dumps(status, separators=(",", ":")).encode()
        topic = status_topic(self.analysis, node)
        info = self.client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_replayed_statuses_of_an_earlier_run_fake_no_split_brain(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    analysis = f"redteam-status-{time.monotonic_ns()}"
    spy = Spy(mqtt_broker, analysis)
    first = _federation(mqtt_broker, tmp_path / "one", analysis, delay=0.5)
    roster = Roster.load(Path(first.env["FLAME_ROSTER"]))
    try:
        first.start_all()
        assert first.finish(timeout=150)["aggregator"]["sum"] == 36.0
        old_node = spy.wait_for("node-0", "computing")
        old_aggregator = spy.wait_for("aggregator", "collecting")
        assert status_signed_by(roster, analysis, "node-0", old_node)
        assert status_signed_by(roster, analysis, "aggregator", old_aggregator)
        # Run 2 starts a little later than CLOCK_SKEW after run 1's statuses were signed:
        # closer than that, a receiver cannot tell a replay from a status of a live process.
        time.sleep(CLOCK_SKEW + 1)
        second = _federation(mqtt_broker, tmp_path / "two", analysis, delay=6)
        try:
            with spy.lock:
                spy.seen.clear()
            second.start_all()
            current = spy.wait_for("node-0", "computing")
            assert current.get("instance") != old_node.get("instance")
            time.sleep(0.5)
            # Genuine signed statuses of run 1, now retained again while run 2 computes.
            spy.replay("node-0", old_node)
            spy.replay("aggregator", old_aggregator)
            time.sleep(1.0)
            spy.replay("node-0", old_node)  # again, after node-0's own status moved on
            values = second.finish(timeout=150)
            log = second.processes["aggregator"].stderr()
        finally:
            second.close()
        assert values["aggregator"] == {"sum": 36.0, "nodes": NODES}, json.dumps(values)[:3000]
        assert "two processes claim" not in log
        assert "stale status" in log, log[-3000:]

        # After the run: run 1's statuses replayed once more; `flame status` must not show
        # them as the run's current state.
        spy.replay("aggregator", old_aggregator)
        spy.replay("node-0", old_node)
        time.sleep(0.5)
        config = FlameConfig(
            broker=mqtt_broker.settings(username=ADMIN),
            roster=Path(first.env["FLAME_ROSTER"]),
        )
        run = StatusClient(config, timeout=5).status(analysis)
        assert run.nodes["aggregator"].current is False, run.nodes["aggregator"]
        assert run.nodes["node-0"].current is False
        assert run.nodes["node-1"].current is True
        assert run.state != "running"
        text = "\n".join(render_status(run))
        assert text.count("NOT CURRENT") == 2, text
    finally:
        spy.close()
        first.close()

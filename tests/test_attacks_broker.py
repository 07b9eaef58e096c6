"""Red team: forged, foreign, relabelled and replayed frames on a real Mosquitto (issue 9).

The attacker holds the broker (its operator: reads and writes every topic) and colludes with
one analysis node (`node-1`, whose identity key it has). It publishes with a raw client into
the inboxes of real `flame run` processes while the run is under way. Every forgery must be
dropped before it is acted on, the run must finish with the honest answer, and no node may
crash on anything it was sent.
"""

from __future__ import annotations

import json
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from broker import ADMIN, Broker, have_mosquitto
from nodes import Federation, federation_env

from flame.clients.message_broker_client import MessageBrokerClient
from flame.transport.mqtt import inbox_topic, status_topic
from flame.wire.envelope import Envelope, encode

identity = pytest.importorskip("flame.identity")
IDENTITY_DIR = "TEST_FLAME_IDENTITY_DIR"  # tests/nodes.py: where each node's key file is

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")

NODES = ["node-0", "node-1"]

ANALYSIS = """
import time

def analyze(data):
    time.sleep(%(delay)s)  # the attacker's frames arrive first
    v = [float(x) for x in data.read_text("v.txt").split()]
    return {"sum": sum(v), "n": len(v)}

def aggregate(results):
    return {"sum": sum(r["sum"] for r in results.values()),
            "nodes": sorted(results)}
"""


class Attacker:
    """The broker operator with node-1's identity key: publishes anything anywhere."""

    def __init__(self, broker: Broker, env: dict[str, str], analysis: str) -> None:
        self.analysis = analysis
        self.roster = identity.Roster.load(Path(env["FLAME_ROSTER"]))
        keys = Path(env[IDENTITY_DIR])
        self.ids = {n: identity.Identity.load(n, keys / f"{n}.key") for n in NODES}
        self.client = MessageBrokerClient(
            broker.url,
            client_id=f"attacker-{time.monotonic_ns()}",
            username=ADMIN,
            password=lambda: broker.password,
        )
        self.client.connect()
        self.captured: list[bytes] = []
        self._watch = threading.Event()

    def signed(self, signer: Any, envelope: Envelope) -> bytes:
        parts = identity.signing.sign_parts(signer, [encode(envelope)])
        return b"".join(bytes(p) for p in parts)

    def publish(self, node: str, payload: bytes) -> None:
        self.client.publish(inbox_topic(self.analysis, node), payload, timeout=30)

    def result(self, sender: str, body: dict[str, Any], epoch: int = 0) -> Envelope:
        return Envelope(self.analysis, sender, "aggregator", "result", epoch, body)

    def close(self) -> None:
        self.client.disconnect()


def _wait_for_status(broker: Broker, analysis: str, node: str, timeout: float = 60) -> None:
    """Until `node` has announced itself (its retained status is on the broker)."""
    import paho.mqtt.client as mqtt

    seen = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{time.time_ns()}")
    client.username_pw_set(ADMIN, broker.password)
    client.on_message = lambda *_: seen.set()
    client.connect(broker.host, broker.port, keepalive=30)
    client.subscribe(status_topic(analysis, node), qos=1)
    client.loop_start()
    try:
        assert seen.wait(timeout), f"{node} never announced itself"
    finally:
        client.loop_stop()
        client.disconnect()


def _federation(
    broker: Broker, tmp_path: Path, analysis: str, values: dict[str, str], delay: float
) -> Federation:
    data = tmp_path / "data"
    for node, text in values.items():
        (data / node).mkdir(parents=True, exist_ok=True)
        (data / node / "v.txt").write_text(text)
    code = tmp_path / "analysis.py"
    code.write_text(textwrap.dedent(ANALYSIS % {"delay": delay}))
    env = federation_env(broker, analysis, NODES, presence_timeout=90, epoch_timeout=90)
    return Federation(env, code, data, NODES, tmp_path / "logs")


def test_forged_sybil_foreign_and_unsigned_frames_never_reach_aggregate(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    analysis = f"redteam-forge-{time.monotonic_ns()}"
    federation = _federation(
        mqtt_broker, tmp_path, analysis, {"node-0": "1 2 3", "node-1": "10 20"}, delay=4
    )
    attacker = Attacker(mqtt_broker, federation.env, analysis)
    stranger = identity.Identity.generate("node-0")  # a key the roster does not know
    try:
        federation.start_all()
        _wait_for_status(mqtt_broker, analysis, "aggregator")
        huge = {"sum": 1e9, "n": 1}
        forged = [
            encode(attacker.result("node-0", huge)),  # unsigned
            attacker.signed(attacker.ids["node-1"], attacker.result("node-0", huge)),  # Sybil
            attacker.signed(stranger, attacker.result("node-0", huge)),  # foreign key
            attacker.signed(  # node-1's own signature on a frame of another analysis
                attacker.ids["node-1"],
                Envelope("other", "node-1", "aggregator", "result", 0, huge),
            ),
            b"FLS\x01\x06node-0" + b"\0" * 64 + encode(attacker.result("node-0", huge)),
            b"FLS" + b"\xff" * 200,
        ]
        for payload in forged:
            attacker.publish("aggregator", payload)
        abort = Envelope(analysis, "aggregator", "node-0", "abort", 0, {"reason": "forged"})
        attacker.publish("node-0", encode(abort))  # unsigned abort "from the aggregator"
        attacker.publish("node-0", attacker.signed(attacker.ids["node-1"], abort))
        values = federation.finish(timeout=150)
    finally:
        attacker.close()
        federation.close()
    assert values["aggregator"] == {"sum": 36.0, "nodes": NODES}
    log = federation.processes["aggregator"].stderr()
    assert log.count("dropped a message claiming to be from 'node-0'") >= 3, log[-3000:]


def test_a_result_captured_in_one_run_is_not_accepted_in_the_next(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    """The operator records node-0's signed result of a run, then replays it into the next
    run of the same analysis id (before node-0's own answer): the genuine signature must
    not make an old result count."""
    analysis = f"redteam-replay-{time.monotonic_ns()}"
    first = _federation(
        mqtt_broker, tmp_path / "one", analysis, {"node-0": "1 2 3", "node-1": "10 20"}, 0
    )
    attacker = Attacker(mqtt_broker, first.env, analysis)
    import paho.mqtt.client as mqtt

    captured: list[bytes] = []
    spy = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"spy-{time.time_ns()}")
    spy.username_pw_set(ADMIN, mqtt_broker.password)
    spy.on_message = lambda _c, _u, message: captured.append(bytes(message.payload))
    spy.connect(mqtt_broker.host, mqtt_broker.port, keepalive=30)
    spy.subscribe(inbox_topic(analysis, "aggregator"), qos=1)
    spy.loop_start()
    try:
        first.start_all()
        assert first.finish(timeout=150)["aggregator"]["sum"] == 36.0
    finally:
        spy.loop_stop()
        spy.disconnect()
        first.close()
    old = []
    for payload in captured:
        try:
            envelope = identity.verify_envelope(payload, attacker.roster)
        except Exception:  # chunks, acks, statuses: not what we replay
            continue
        if envelope.kind == "result" and envelope.sender == "node-0":
            old.append(payload)
    assert old, "no signed result of node-0 was captured"
    second = _federation(
        mqtt_broker, tmp_path / "two", analysis, {"node-0": "100", "node-1": "10 20"}, delay=4
    )
    try:
        second.start_all()
        _wait_for_status(mqtt_broker, analysis, "aggregator")
        time.sleep(1.0)  # the aggregator has sent its kick-off; node-0 is still computing
        for payload in old:
            attacker.publish("aggregator", payload)
        values = second.finish(timeout=150)
    finally:
        attacker.close()
        second.close()
    assert values["aggregator"] == {"sum": 130.0, "nodes": NODES}, json.dumps(values)


def test_a_participant_borrowing_another_nodes_client_id_does_not_stop_the_run(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    """node-1 connects once with node-0's client id (its own broker login): the broker
    closes node-0's connection. node-0 must reconnect and the run finish, not stop as if a
    second process claimed node-0 (only a signed status of another instance proves that)."""
    import paho.mqtt.client as mqtt

    from flame.transport.mqtt import client_id_for

    analysis = f"redteam-takeover-{time.monotonic_ns()}"
    federation = _federation(
        mqtt_broker, tmp_path, analysis, {"node-0": "1 2 3", "node-1": "10 20"}, delay=6
    )
    try:
        federation.start_all()
        _wait_for_status(mqtt_broker, analysis, "node-0")
        time.sleep(1.0)
        thief = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id_for(analysis, "node-0"),
            protocol=mqtt.MQTTv5,
        )
        thief.username_pw_set("node-1", mqtt_broker.password)  # node-1's own broker login
        thief.connect(mqtt_broker.host, mqtt_broker.port, keepalive=30, clean_start=False)
        thief.loop_start()
        time.sleep(1.0)
        thief.loop_stop()
        thief.disconnect()
        values = federation.finish(timeout=150)
    finally:
        federation.close()
    assert values["aggregator"] == {"sum": 36.0, "nodes": NODES}
    taken = f"Client {client_id_for(analysis, 'node-0')} already connected"
    assert taken in mqtt_broker.log_text(), "the takeover did not happen"

"""The aggregator's broadcast topic on a real broker: one publish reaches every listening node,
and nothing else gets through it (forged senders, wrong kinds, copies in an inbox)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from broker import Broker

from flame.identity import Authenticator, Identity, Member, Roster
from flame.transport.mqtt import MqttTransport, broadcast_topic, inbox_topic
from flame.wire.envelope import EVERYONE, Envelope, decode, encode

_counter = iter(range(1_000_000))


def unique() -> str:
    return f"bcast-{os.getpid()}-{next(_counter)}"


class Federation:
    """Signed transports of one analysis: an aggregator and analysis nodes."""

    def __init__(self, broker: Broker, nodes: list[str]) -> None:
        self.broker = broker
        self.analysis = unique()
        self.ids = {n: Identity.generate(n) for n in ["aggregator", *nodes]}
        role = {"aggregator": "aggregation"}
        self.roster = Roster(
            [Member(n, role.get(n, "analysis"), i.public_text) for n, i in self.ids.items()]
        )
        self.made: list[MqttTransport] = []

    def transport(self, node: str) -> MqttTransport:
        made = MqttTransport(
            self.broker.settings(),
            self.analysis,
            node,
            auth=Authenticator(self.ids[node], self.roster),
            reconnect_delay=(1, 2),
        )
        self.made.append(made)
        return made

    def join(self, node: str, *, broadcasts: bool = True) -> MqttTransport:
        made = self.transport(node)
        if broadcasts:
            made.take_broadcasts()
        made.connect({"state": "waiting"})
        return made

    def close(self) -> None:
        for made in self.made:
            with contextlib.suppress(Exception):
                made.close()


@pytest.fixture
def federation(mqtt_broker: Broker) -> Iterator[Federation]:
    made = Federation(mqtt_broker, ["alice", "bob", "carol"])
    yield made
    made.close()


def kinds(transport: MqttTransport, seconds: float) -> list[tuple[str, Any]]:
    """(kind, body) of every non-status message arriving within `seconds`."""
    got = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        envelope = transport.receive(left)
        if envelope is not None and envelope.kind != "status":
            got.append((envelope.kind, envelope.body))
    return got


def kickoff(analysis: str, sender: str = "aggregator", kind: Any = "aggregate") -> Envelope:
    return Envelope(analysis, sender, EVERYONE, kind, 3, {"value": 42, "session": "s"})


def test_one_publish_reaches_every_listening_node_and_says_so_in_the_status(
    federation: Federation,
) -> None:
    aggregator = federation.join("aggregator", broadcasts=False)
    aggregator.watch(["alice", "bob", "carol"])
    nodes = {n: federation.join(n) for n in ("alice", "bob")}
    quiet = federation.join("carol", broadcasts=False)  # e.g. share_aggregate = false

    def statuses() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            envelope = aggregator.receive(0.5)
            if envelope is not None and envelope.kind == "status":
                seen[envelope.sender] = envelope.body
        return seen

    # a subscription is not proof (Mosquitto grants one its ACL never delivers on): nobody
    # claims broadcasts until one has reached it, e.g. the aggregator's probe
    assert all("broadcast" not in status for status in statuses().values())
    aggregator.probe_broadcast(kickoff(federation.analysis))
    for transport in (*nodes.values(), quiet):
        kinds(transport, 0.5)  # what the transport lets through to the node: the probe
        transport.announce({"state": "waiting"})
    claimed = statuses()
    assert claimed["alice"].get("broadcast") is True and claimed["bob"].get("broadcast") is True
    assert "broadcast" not in claimed["carol"]
    sent_before = aggregator.bytes_sent
    delivery = aggregator.broadcast(kickoff(federation.analysis), ["alice", "bob"])
    delivery.wait()
    assert delivery.check()
    one_frame = aggregator.bytes_sent - sent_before
    for node, transport in nodes.items():
        assert kinds(transport, 1.0) == [("aggregate", {"value": 42, "session": "s"})], node
    assert kinds(quiet, 0.5) == []
    # the same kick-off one by one costs one signed frame per node
    sent_before = aggregator.bytes_sent
    copies = [
        Envelope(federation.analysis, "aggregator", n, "aggregate", 3, {"value": 42})
        for n in ("alice", "bob")
    ]
    aggregator.dispatch(copies).wait()
    assert aggregator.bytes_sent - sent_before > 1.8 * one_frame


def test_a_lone_recipient_gets_its_own_copy(federation: Federation) -> None:
    aggregator = federation.join("aggregator", broadcasts=False)
    a = federation.join("alice")
    b = federation.join("bob")
    aggregator.broadcast(kickoff(federation.analysis), ["alice"]).wait()
    assert kinds(a, 1.0) == [("aggregate", {"value": 42, "session": "s"})]
    assert kinds(b, 0.5) == []  # not on the broadcast topic, so b does not see it


def test_forged_or_misplaced_broadcasts_are_dropped(federation: Federation) -> None:
    a = federation.join("alice")
    b = federation.join("bob")
    # the broker's operator (admin) publishes whatever it likes
    raw = federation.transport("carol")  # only for its signature: c is an analysis member
    genuine_aggregator = federation.transport("aggregator")
    topic = broadcast_topic(federation.analysis)
    client = _admin_client(federation.broker)
    try:
        forged = [
            # an analysis node signs a kick-off for everyone: its role may not send one
            b"".join(bytes(p) for p in raw.outgoing(kickoff(federation.analysis, "carol"))),
            # unsigned
            encode(kickoff(federation.analysis)),
        ]
        for payload in forged:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
        # a genuine broadcast copied into a's inbox: addressed to everyone, not to a
        genuine = genuine_aggregator.outgoing(kickoff(federation.analysis))
        client.publish(
            inbox_topic(federation.analysis, "alice"), b"".join(bytes(p) for p in genuine), qos=1
        ).wait_for_publish(5)
        assert kinds(a, 1.5) == []
        assert kinds(b, 0.3) == []
        assert a.dropped >= 3
    finally:
        client.loop_stop()
        client.disconnect()


@pytest.mark.parametrize("kind", ["abort", "result", "message", "ack"])
def test_only_kick_offs_and_the_end_can_be_addressed_to_everyone(kind: str) -> None:
    envelope = kickoff("x", kind=kind)
    with pytest.raises(Exception, match="recipient"):
        decode(encode(envelope))
    with pytest.raises(ValueError, match="broadcast"):
        kickoff("x").reply("ack")


def test_a_node_not_taking_broadcasts_ignores_a_subscription_left_in_its_session(
    federation: Federation,
) -> None:
    aggregator = federation.join("aggregator", broadcasts=False)
    a = federation.join("alice")
    federation.join("bob")
    a.close()  # the session (and its broadcast subscription) stays with the broker
    again = federation.join("alice", broadcasts=False)  # now its policy declines aggregates
    aggregator.broadcast(kickoff(federation.analysis), ["alice", "bob"]).wait()
    assert kinds(again, 1.0) == []


def _admin_client(broker: Broker) -> Any:
    import paho.mqtt.client as mqtt
    from broker import ADMIN

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"admin-{unique()}")
    if broker.password is not None:
        client.username_pw_set(ADMIN, broker.password)
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    return client

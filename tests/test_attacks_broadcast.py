"""Red team (redteam3): the aggregator's broadcast topic under an attacker holding the broker.

The attacker publishes, replays (also as retained messages) and withholds anything on
`flame/ID/broadcast`. A node must act only on genuine kick-offs of the live aggregator
process, a node whose policy declines other sites' aggregates (share_aggregate = false) must
not be sent them, and a broadcast the broker refuses must fail loudly, naming the topic.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from broker import ADMIN, Broker, have_mosquitto
from test_broadcast import Federation, kickoff, kinds

from flame.errors import TransportError
from flame.messages import EVERYONE, Envelope, encode
from flame.transport._chunks import CHUNK_MAGIC, REFERENCE_MAGIC
from flame.transport.mqtt import MqttTransport, broadcast_topic

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")


@pytest.fixture
def fed(mqtt_broker: Broker) -> Iterator[Federation]:
    made = Federation(mqtt_broker, ["alice", "bob", "carol"])
    yield made
    made.close()


def admin(broker: Broker) -> Any:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"rt3-admin-{time.monotonic_ns()}",
        protocol=mqtt.MQTTv5,
    )
    client.username_pw_set(ADMIN, broker.password)
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    return client


def frame(transport: MqttTransport, envelope: Envelope) -> bytes:
    return b"".join(bytes(p) for p in transport.outgoing(envelope))


def spy_topics(transport: MqttTransport) -> list[str]:
    """Every topic the broker delivers to `transport` from now on (before any check)."""
    seen: list[str] = []
    client = transport.client
    get = client.get

    def spying(timeout: float) -> Any:
        message = get(timeout)
        if message is not None:
            seen.append(message.topic)
        return message

    client.get = spying  # type: ignore[method-assign]
    return seen


def test_a_declining_node_is_not_sent_broadcasts_by_a_subscription_left_in_its_session(
    fed: Federation,
) -> None:
    """share_aggregate = false: the aggregate must not even reach the node's process (its
    earlier process, which shared, left the broadcast subscription in the broker session)."""
    aggregator = fed.join("aggregator", broadcasts=False)
    alice = fed.join("alice")
    fed.join("bob")
    alice.close()
    again = fed.join("alice", broadcasts=False)
    seen = spy_topics(again)
    aggregator.broadcast(kickoff(fed.analysis), ["bob", "carol"]).wait()
    assert kinds(again, 1.0) == []
    assert broadcast_topic(fed.analysis) not in seen, "the aggregate reached the declining node"


def test_malformed_and_misaddressed_frames_on_the_broadcast_topic_are_dropped(
    fed: Federation,
) -> None:
    aggregator = fed.join("aggregator", broadcasts=False)
    alice = fed.join("alice")
    bob = fed.join("bob")
    signer = fed.transport("aggregator")  # the genuine aggregator key, for misaddressed frames
    topic = broadcast_topic(fed.analysis)
    other = Envelope("other-analysis", "aggregator", EVERYONE, "aggregate", 3, {"value": 1})
    hostile = [
        b"",
        b"\x00",
        b"FLM",
        b"FLS",
        b"garbage" * 100,
        CHUNK_MAGIC + b"\x00" * 64,
        REFERENCE_MAGIC + b"\x00" * 64,
        b"FLS" + b"\xff" * 200,
        frame(signer, kickoff(fed.analysis))[:-1],  # truncated signature
        frame(signer, Envelope(fed.analysis, "aggregator", "alice", "aggregate", 3, {"v": 1})),
        frame(signer, other),  # a genuine broadcast of another analysis
        encode(kickoff(fed.analysis)),  # unsigned
        b"FLM" + b"\x00" * 2_000_000,  # over any limit
    ]
    client = admin(fed.broker)
    try:
        for payload in hostile:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
        client.publish(topic, b"FLS-retained-junk", qos=1, retain=True).wait_for_publish(5)
        late = fed.join("carol")  # gets the retained junk at subscribe time
        assert kinds(alice, 2.0) == []
        assert kinds(bob, 0.5) == []
        assert kinds(late, 0.5) == []
        assert alice.dropped >= len(hostile) - 2  # b"" may be taken as a cleared message
        # every node still works: a genuine kick-off comes through after all that
        aggregator.broadcast(kickoff(fed.analysis), ["alice", "bob", "carol"]).wait()
        for node in (alice, bob, late):
            assert kinds(node, 1.0) == [("aggregate", {"value": 42, "session": "s"})]
    finally:
        with contextlib.suppress(Exception):
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        client.loop_stop()
        client.disconnect()


def test_a_genuine_broadcast_replayed_as_retained_is_only_a_stale_kick_off(
    fed: Federation,
) -> None:
    """Transport level: a captured genuine broadcast replayed (retained) arrives as what it
    was, an old aggregator process's kick-off with its session; the client's session check
    (test below, whole run) must drop it."""
    aggregator = fed.join("aggregator", broadcasts=False)
    alice = fed.join("alice")
    fed.join("bob")
    captured = frame(aggregator, kickoff(fed.analysis))
    client = admin(fed.broker)
    try:
        client.publish(broadcast_topic(fed.analysis), captured, qos=1, retain=True)
        got = kinds(alice, 1.0)
        assert got == [("aggregate", {"value": 42, "session": "s"})]
        late = fed.join("carol")
        assert kinds(late, 1.0) == [("aggregate", {"value": 42, "session": "s"})]
    finally:
        client.publish(broadcast_topic(fed.analysis), b"", qos=1, retain=True).wait_for_publish(5)
        client.loop_stop()
        client.disconnect()


def test_a_refused_broadcast_fails_loudly_naming_the_topic(tmp_path: Any) -> None:
    broker = Broker(tmp_path / "broker")
    (broker.directory / "acl").write_text(
        f"user {ADMIN}\ntopic readwrite #\n\n"
        "pattern read flame/+/%u/inbox\n"
        "pattern write flame/+/+/inbox\n"
        "pattern readwrite flame/+/%u/status\n"
        "pattern read flame/+/+/status\n"
        "pattern read flame/+/broadcast\n"  # read only: the aggregator may not publish
    )
    with broker:
        fed = Federation(broker, ["alice", "bob"])
        try:
            aggregator = fed.join("aggregator", broadcasts=False)
            fed.join("alice")
            fed.join("bob")
            started = time.monotonic()
            delivery = aggregator.broadcast(kickoff(fed.analysis), ["alice", "bob"], timeout=5)
            with pytest.raises(TransportError, match=r"refused the message on flame/.*/broadcast"):
                delivery.wait()
            assert time.monotonic() - started < 6
        finally:
            fed.close()

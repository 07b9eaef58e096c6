"""Red team (redcast): a broadcast sent once as chunks or one claim-checked copy (81f3f17).

Seats: a broker operator (publishes, replays, reorders anything; no roster key), a colluding
analysis member (its own key; in an unsigned run, no ACL keeps it off the broadcast topic), a
late node. Tests that fail show an attack that works; passing ones pin a defence."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from broker import Broker, have_mosquitto
from test_attacks_broadcast import admin
from test_broadcast import kinds
from test_broadcast_chunks import (
    CHUNK,
    SmallChunks,
    arrays,
    chunks_of,
    held,
    model_kickoff,
    publish_all,
)

from flame.transport.mqtt import MqttTransport, broadcast_topic, inbox_topic
from flame.wire.chunks import chunk_header_size, encode_reference, split_frame
from flame.wire.envelope import EVERYONE, Envelope

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")

LIMIT = 64 * 1024  # max_message_bytes of the claim-check tests' nodes


@pytest.fixture
def signed_fed(mqtt_broker: Broker) -> Iterator[SmallChunks]:
    made = SmallChunks(mqtt_broker, ["alice", "bob", "carol"])
    yield made
    made.close()


@pytest.fixture
def unsigned_fed(mqtt_broker: Broker) -> Iterator[SmallChunks]:
    made = SmallChunks(mqtt_broker, ["alice", "bob", "carol"], signed=False)
    yield made
    made.close()


def test_operator_interleaving_two_genuine_chunked_kick_offs_corrupts_neither(
    signed_fed: SmallChunks,
) -> None:
    """DEFENCE (broker operator): chunks of two genuine broadcasts (epochs 3 and 4), shuffled
    into one stream, are two transfers (own ids, own sealed manifests): both arrive whole and
    unchanged, and nothing stays held."""
    fed = signed_fed
    alice = fed.join("alice")
    genuine = fed.transport("aggregator")
    first = model_kickoff(fed.analysis, seed=1)
    second = replace(model_kickoff(fed.analysis, seed=2), epoch=4)
    a, b = chunks_of(genuine, first, EVERYONE), chunks_of(genuine, second, EVERYONE)
    order = np.random.default_rng(7).permutation(len(a) + len(b))
    both = [*a, *b]
    client = admin(fed.broker)
    try:
        publish_all(client, broadcast_topic(fed.analysis), [both[i] for i in order])
        got = arrays(alice, 4.0)
        assert len(got) == 2
        wanted = [first.body["value"], second.body["value"]]
        assert all(any(np.array_equal(g, w) for g in got) for w in wanted)
        assert held(alice) == 0
    finally:
        client.loop_stop()
        client.disconnect()


def test_operator_replaying_a_delivered_chunked_kick_off_gets_no_second_copy(
    signed_fed: SmallChunks,
) -> None:
    """DEFENCE (broker operator): the complete, genuine chunked kick-off replayed right after it
    was taken (transfer id remembered as closed) is not reassembled or delivered again, and the
    node holds nothing for it. (Later replays, after the id is forgotten or to a restarted
    process, reach the envelope-level epoch/run checks like a one-frame replay.)"""
    fed = signed_fed
    alice = fed.join("alice")
    genuine = fed.transport("aggregator")
    chunks = chunks_of(genuine, model_kickoff(fed.analysis), EVERYONE)
    topic = broadcast_topic(fed.analysis)
    client = admin(fed.broker)
    try:
        publish_all(client, topic, chunks)
        assert len(arrays(alice, 3.0)) == 1
        publish_all(client, topic, list(reversed(chunks)))
        assert kinds(alice, 1.5) == []
        assert held(alice) == 0
    finally:
        client.loop_stop()
        client.disconnect()


def sealed_for_everyone(signer: MqttTransport, envelope: Envelope) -> list[bytes]:
    """`envelope` as it is (any recipient, any analysis) in chunks sealed for EVERYONE."""
    parts = signer.outgoing(envelope)
    auth = signer.auth
    sign = None if auth is None else auth.chunk_signer(signer.analysis_id, EVERYONE)
    piece = CHUNK - chunk_header_size(None if auth is None else signer.node_id)
    return [bytes(c) for c in split_frame(parts, piece, sign=sign)]


@pytest.mark.parametrize("twist", ["to one node", "another analysis"])
def test_colluder_chunked_broadcast_not_for_everyone_here_is_dropped(
    unsigned_fed: SmallChunks, twist: str
) -> None:
    """DEFENCE (colluding member, unsigned run: no ACL on the broadcast topic): chunks on the
    broadcast topic whose reassembled envelope is addressed to one node, or belongs to another
    analysis, are dropped after reassembly like a one-frame one, and do not make the node
    claim it hears broadcasts (which would stop the aggregator sending it its own copy)."""
    fed = unsigned_fed
    alice = fed.join("alice")
    carol = fed.transport("carol")
    envelope = model_kickoff(fed.analysis)
    if twist == "to one node":
        envelope = replace(envelope, recipient="alice")
    else:
        envelope = replace(envelope, analysis=fed.analysis + "-other")
    client = admin(fed.broker)
    try:
        publish_all(client, broadcast_topic(fed.analysis), sealed_for_everyone(carol, envelope))
        assert kinds(alice, 2.0) == []
        assert alice.dropped >= 1
        assert not alice._heard_broadcast
        assert held(alice) == 0
    finally:
        client.loop_stop()
        client.disconnect()


# --- claim-check references on the broadcast topic ------------------------------------------


@pytest.fixture
def stored(fresh_broker: Broker, s3_server: Any, s3_bucket: str) -> Iterator[tuple[Any, Any]]:
    """(federation whose nodes have max_message_bytes LIMIT and a claim check, store)."""
    from flame.clients.minio_client import MinioStore
    from flame.config import StorageSettings

    store = MinioStore.from_settings(StorageSettings(**s3_server.settings(bucket=s3_bucket)))
    store.ensure_bucket()
    fed = SmallChunks(fresh_broker, ["alice", "bob", "carol"])
    yield fed, store
    fed.close()


def _claim_checked_node(
    fed: SmallChunks, store: Any, node: str, broadcasts: bool = True
) -> MqttTransport:
    from flame.transport.claim_check import StorageClaimCheck

    made = fed.transport(node)
    made.settings = fed.broker.settings(chunk_size=4096, max_message_bytes=LIMIT)
    made._claim_check = StorageClaimCheck(store, fed.analysis, node)
    if broadcasts:
        made.take_broadcasts()
    made.connect({"state": "waiting"})
    return made


def _spy_downloads(store: Any) -> list[int]:
    """Sizes of what `store.get_bytes` pulled into memory from now on (raised or not)."""
    sizes: list[int] = []
    get_to = store.client.get_object

    def spying(*args: Any, **kwargs: Any) -> Any:
        response = get_to(*args, **kwargs)
        read = response.read

        def reading(*a: Any, **k: Any) -> bytes:
            data: bytes = read(*a, **k)
            sizes.append(len(data))
            return data

        response.read = reading
        return response

    store.client.get_object = spying
    return sizes


@pytest.mark.parametrize("channel", ["broadcast", "inbox"])
def test_claim_check_reference_pulls_an_object_over_the_limit_into_every_node(
    stored: tuple[SmallChunks, Any], channel: str
) -> None:
    """ATTACK (broadcast: broker operator, one publish reaches every listening node; inbox: a
    colluding member, whom the ACL lets write to every inbox and who may store under its own
    payloads/ prefix): a 100-byte claim-check reference declaring a small size but naming a
    large object under the analysis root (the final result; the member's own upload) makes
    the node download the whole object into memory on its receive thread before the
    size/SHA-256 check drops the message; repeatable at will, bounded by the largest object
    in the analysis, not max_message_bytes (a large enough one takes the node down).
    Why it works: `_fetch_claim_check` (src/flame/transport/mqtt_receive.py) bounds only the
    size the reference declares; `StorageClaimCheck.fetch` (src/flame/transport/
    claim_check.py:76) reads the object whole (`MinioStore.get_bytes`: `response.read()`
    without a limit). The broadcast case is new with 81f3f17 (the topic refused references
    before); the inbox case predates it. Claimed: a node never holds more than
    max_message_bytes for one message."""
    fed, store = stored
    if channel == "broadcast":
        big = f"{fed.analysis}/final/result.bin"
        topic = broadcast_topic(fed.analysis)
    else:
        big = f"{fed.analysis}/payloads/carol/{'ab' * 16}.bin"
        topic = inbox_topic(fed.analysis, "alice")
    store.put_stream(big, io.BytesIO(os.urandom(16 * LIMIT)))
    alice = _claim_checked_node(fed, store, "alice")
    bob = _claim_checked_node(fed, store, "bob")
    sizes = _spy_downloads(store)
    client = admin(fed.broker)
    try:
        reference = encode_reference(big, 1000, os.urandom(32))
        client.publish(topic, reference, qos=1).wait_for_publish(5)
        assert kinds(alice, 2.0) == [] and kinds(bob, 0.5) == []
        biggest = max(sizes, default=0)
        assert biggest <= LIMIT, f"a node read {biggest} bytes for a {LIMIT}-byte limit"
    finally:
        client.loop_stop()
        client.disconnect()


def test_operator_claim_check_reference_outside_the_analysis_is_never_fetched(
    stored: tuple[SmallChunks, Any],
) -> None:
    """DEFENCE (broker operator): a reference on the broadcast topic naming another analysis's
    object (a genuine kick-off of another run under another id) is refused before any
    download; the node takes nothing."""
    fed, store = stored
    other = f"{fed.analysis}x/payloads/aggregator/feed.bin"
    store.put_stream(other, io.BytesIO(b"x" * 1000))
    alice = _claim_checked_node(fed, store, "alice")
    sizes = _spy_downloads(store)
    client = admin(fed.broker)
    try:
        reference = encode_reference(other, 1000, os.urandom(32))
        client.publish(broadcast_topic(fed.analysis), reference, qos=1).wait_for_publish(5)
        assert kinds(alice, 1.5) == []
        assert alice.dropped >= 1
        assert sizes == []
    finally:
        client.loop_stop()
        client.disconnect()


def test_operator_swapping_genuine_claim_checks_between_inbox_and_broadcast_gets_nothing_taken(
    stored: tuple[SmallChunks, Any],
) -> None:
    """DEFENCE (broker operator): the reference of a genuine claim-checked message to alice
    replayed on the broadcast topic, and that of a genuine claim-checked broadcast replayed
    into alice's inbox, fetch genuine signed frames whose recipient is not the channel's:
    dropped, so neither a per-node message reaches every node nor a broadcast counts twice."""
    fed, store = stored
    aggregator = _claim_checked_node(fed, store, "aggregator", broadcasts=False)
    alice = _claim_checked_node(fed, store, "alice")
    bob = _claim_checked_node(fed, store, "bob")
    inbox, topic = inbox_topic(fed.analysis, "alice"), broadcast_topic(fed.analysis)
    captured: dict[str, list[bytes]] = {inbox: [], topic: []}
    client = admin(fed.broker)
    client.on_message = lambda c, u, m: captured[m.topic].append(bytes(m.payload))
    client.subscribe([(inbox, 1), (topic, 1)])
    time.sleep(0.3)
    try:
        value = np.arange(4000, dtype=np.float64)  # 32 KB: over the threshold, under LIMIT
        aggregator.send(
            Envelope(fed.analysis, "aggregator", "alice", "aggregate", 3, {"value": value})
        )
        everyone = Envelope(fed.analysis, "aggregator", EVERYONE, "aggregate", 4, {"value": -value})
        aggregator.broadcast(everyone, ["alice", "bob"]).wait()
        assert [k for k, _ in kinds(alice, 2.0)] == ["aggregate", "aggregate"]
        assert [k for k, _ in kinds(bob, 0.5)] == ["aggregate"]
        references = {t: [p for p in got if p[:3] == b"FLR"] for t, got in captured.items()}
        assert len(references[inbox]) == 1 and len(references[topic]) == 1
        publish_all(client, topic, references[inbox])
        publish_all(client, inbox, references[topic])
        assert kinds(alice, 1.5) == [] and kinds(bob, 0.3) == []
        assert alice.dropped >= 2 and bob.dropped >= 1
    finally:
        client.loop_stop()
        client.disconnect()


def test_late_node_with_half_a_kick_off_takes_the_genuine_one_after_the_timeout(
    signed_fed: SmallChunks,
) -> None:
    """DEFENCE (late node + broker operator replaying): a node that joined late holds the
    half of a genuine transfer it saw; its budget is the aggregator's only, and when the
    partial expires the next genuine kick-off is taken whole (no lasting lock-out)."""
    fed = signed_fed
    alice = fed.transport("alice")
    alice._broadcast_reassembler.timeout = 0.8
    alice.take_broadcasts()
    alice.connect({"state": "waiting"})
    genuine = fed.transport("aggregator")
    topic = broadcast_topic(fed.analysis)
    client = admin(fed.broker)
    try:
        old = [chunks_of(genuine, model_kickoff(fed.analysis, seed=s), EVERYONE) for s in (1, 2)]
        publish_all(client, topic, [c for chunks in old for c in chunks[1:]])
        assert kinds(alice, 0.3) == [] and held(alice) > 0
        time.sleep(1.0)
        assert kinds(alice, 0.3) == [] and held(alice) == 0
        fresh = replace(model_kickoff(fed.analysis, seed=3), epoch=5)
        publish_all(client, topic, chunks_of(genuine, fresh, EVERYONE))
        got = arrays(alice, 3.0)
        assert len(got) == 1 and np.array_equal(got[0], fresh.body["value"])
    finally:
        client.loop_stop()
        client.disconnect()

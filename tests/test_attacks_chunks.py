"""Red team: chunk-reassembly denial of service on a real Mosquitto.

Reassembly happens before an envelope's signature can be checked. The attacker can publish on
the broker (its operator, or leaked broker credentials) but holds no roster identity key; in
the second test it also holds one roster member's key (`mallory`). It floods a signed node's
inbox with first chunks of transfers that claim the largest allowed size and never finish.
Before signed chunk manifests, the node held its whole reassembly budget (2 x
`max_message_bytes`) for the forgeries and refused the honest chunked message that followed.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Iterator

import numpy as np
import pytest
from broker import ADMIN, Broker, have_mosquitto

from flame.clients.message_broker_client import MessageBrokerClient, PendingPublish
from flame.identity import Identity, Member, Roster
from flame.identity.signing import Authenticator
from flame.transport.mqtt import MqttTransport, inbox_topic
from flame.wire.chunks import chunk_header_size, split_frame
from flame.wire.envelope import Envelope

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")

LIMIT = 2 * 1024 * 1024  # max_message_bytes: the node's budget is twice that
CHUNK = 64 * 1024
MARKER = b"ATTACKER-PAYLOAD-"  # must never appear in a log line
NAMES = ("aggregator", "alice", "mallory")


@pytest.fixture
def federation() -> tuple[Roster, dict[str, Identity]]:
    ids = {name: Identity.generate(name) for name in NAMES}
    roles = {"aggregator": "aggregation"}
    roster = Roster([Member(n, roles.get(n, "analysis"), ids[n].public_text) for n in NAMES])
    return roster, ids


@pytest.fixture
def attacker(mqtt_broker: Broker) -> Iterator[MessageBrokerClient]:
    client = MessageBrokerClient(
        mqtt_broker.url,
        client_id=f"chunk-attacker-{time.monotonic_ns()}",
        username=ADMIN,
        password=lambda: mqtt_broker.password,
    )
    client.connect()
    yield client
    client.disconnect()


def _node(
    broker: Broker, analysis: str, name: str, roster: Roster, ids: dict[str, Identity]
) -> MqttTransport:
    settings = broker.settings(max_message_bytes=LIMIT, chunk_size=CHUNK)
    node = MqttTransport(
        settings, analysis, name, auth=Authenticator(ids[name], roster), reconnect_delay=(1, 2)
    )
    node.connect({"state": "waiting"})
    return node


def _forged_chunk(transfer: bytes, seal: bytes, version: int) -> bytes:
    """The first chunk of a transfer claiming LIMIT bytes, in the attacker's own encoding."""
    piece = CHUNK - chunk_header_size()
    count = -(-LIMIT // piece)
    header = struct.pack(
        ">3sB16sIIIQ32s", b"FLC", version, transfer, 0, count, piece, LIMIT, os.urandom(32)
    )
    return header + seal + (MARKER * (piece // len(MARKER) + 1))[:piece]


def _flood(client: MessageBrokerClient, topic: str, payloads: Iterator[bytes]) -> int:
    window: list[PendingPublish] = []
    sent = 0
    for payload in payloads:
        window.append(client.publish_nowait(topic, payload))
        sent += 1
        if len(window) >= 64:
            for pending in window:
                pending.wait(30)
            window.clear()
    for pending in window:
        pending.wait(30)
    return sent


def _honest(analysis: str, sender: str) -> Envelope:
    """A result of about 1.5 MB: 24 chunks of 64 KiB."""
    values = np.random.default_rng(3).standard_normal(190_000)
    return Envelope(analysis, sender, "aggregator", "result", 0, {"w": values})


def _receive_result(node: MqttTransport, timeout: float) -> Envelope | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        item = node.receive(left)
        if item is not None and item.kind == "result":
            return item
    return None


def test_forged_chunk_manifests_are_dropped_before_any_buffering(
    mqtt_broker: Broker,
    attacker: MessageBrokerClient,
    federation: tuple[Roster, dict[str, Identity]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    roster, ids = federation
    analysis = f"chunk-dos-{time.monotonic_ns()}"
    aggregator = _node(mqtt_broker, analysis, "aggregator", roster, ids)
    alice = _node(mqtt_broker, analysis, "alice", roster, ids)
    stranger = Identity.generate("alice")  # a key the roster does not know
    foreign = Roster([Member("alice", "analysis", stranger.public_text)])
    sign = Authenticator(stranger, foreign).chunk_signer(analysis, "aggregator")
    piece = CHUNK - chunk_header_size("alice")
    try:

        def forgeries() -> Iterator[bytes]:
            for i in range(300):
                transfer = os.urandom(16)
                kind = i % 4
                if kind == 0:  # unsigned (version 1), as before the fix
                    yield _forged_chunk(transfer, b"", 1)
                elif kind == 1:  # claims alice, random signature
                    yield _forged_chunk(transfer, b"\x05alice" + os.urandom(64), 2)
                elif kind == 2:  # claims someone not in the roster
                    yield _forged_chunk(transfer, b"\x06nobody" + os.urandom(64), 2)
                else:  # a real signature by a foreign key, for alice's name
                    chunks = split_frame([MARKER * (LIMIT // len(MARKER))], piece, sign=sign)
                    yield bytes(next(chunks))

        topic = inbox_topic(analysis, "aggregator")
        with caplog.at_level(logging.WARNING, logger="flame.transport.mqtt_receive"):
            sent = _flood(attacker, topic, forgeries())
            honest = _honest(analysis, "alice")
            alice.send(honest)  # chunked, after the whole flood in the same inbox
            got = _receive_result(aggregator, 60)
        assert got is not None and got.id == honest.id, "the honest chunked result was lost"
        np.testing.assert_array_equal(got.body["w"], honest.body["w"])
        reassembler = aggregator._reassembler
        assert reassembler.open_transfers == 0 and reassembler.pending_bytes == 0
        assert aggregator.dropped >= sent and reassembler.refused >= sent
        lines = [r.getMessage() for r in caplog.records if "aggregator dropped" in r.getMessage()]
        assert len(lines) >= sent
        assert all(r.levelno == logging.WARNING for r in caplog.records if "dropped" in r.msg)
        assert not any(MARKER.decode() in line for line in lines), "payload in the log"
        print(f"{sent} forged first chunks claiming {LIMIT} bytes each: 0 bytes buffered")
    finally:
        alice.close()
        aggregator.close()


def test_a_roster_member_cannot_take_the_budget_of_the_others(
    mqtt_broker: Broker,
    attacker: MessageBrokerClient,
    federation: tuple[Roster, dict[str, Identity]],
) -> None:
    """mallory's key leaked: validly signed manifests, never finished. Her transfers count
    against her own limits; alice's result still gets through."""
    roster, ids = federation
    analysis = f"chunk-insider-{time.monotonic_ns()}"
    aggregator = _node(mqtt_broker, analysis, "aggregator", roster, ids)
    alice = _node(mqtt_broker, analysis, "alice", roster, ids)
    mallory = Authenticator(ids["mallory"], roster).chunk_signer(analysis, "aggregator")
    piece = CHUNK - chunk_header_size("mallory")
    try:

        def first_chunks() -> Iterator[bytes]:
            for _ in range(40):
                frame = os.urandom(LIMIT // 2)
                yield bytes(next(split_frame([frame], piece, sign=mallory)))

        _flood(attacker, inbox_topic(analysis, "aggregator"), first_chunks())
        honest = _honest(analysis, "alice")
        alice.send(honest)
        got = _receive_result(aggregator, 60)
        assert got is not None and got.id == honest.id
        reassembler = aggregator._reassembler
        held = reassembler._senders.get("mallory", (0, 0))
        assert held[1] <= reassembler.max_sender_bytes
        assert held[0] <= reassembler.max_sender_transfers
        assert reassembler.pending_bytes <= reassembler.max_sender_bytes
        assert reassembler.refused >= 40 - reassembler.max_sender_bytes // (LIMIT // 2)
    finally:
        alice.close()
        aggregator.close()

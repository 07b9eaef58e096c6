"""MqttTransport against a real broker: delivery, presence, sessions, restarts, large frames."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from broker import ADMIN, Broker, say

from flame.clients.message_broker_client import MessageBrokerClient, PendingPublish
from flame.config import BrokerSettings
from flame.errors import TransportError
from flame.transport.mqtt import MqttTransport, client_id_for, inbox_topic
from flame.wire.chunks import Buffer, split_frame
from flame.wire.envelope import Envelope, encode, encode_parts

ANALYSIS = "mqtt-test"
_counter = iter(range(1_000_000))


def unique(prefix: str) -> str:
    """A fresh analysis id per test: the session broker keeps every session and status."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


def envelope(analysis: str, sender: str, recipient: str, body: Any, epoch: int = 0) -> Envelope:
    return Envelope(analysis, sender, recipient, "result", epoch=epoch, body=body)


def receive_kind(transport: MqttTransport, kind: str, timeout: float) -> Envelope | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        item = transport.receive(left)
        if item is None:
            return None
        if item.kind == kind:
            return item
    return None


class Nodes:
    """Transports that are closed at the end of the test, whatever happens."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.made: list[MqttTransport] = []

    def make(
        self, analysis: str, node: str, settings: BrokerSettings | None = None, **options: Any
    ) -> MqttTransport:
        options.setdefault("reconnect_delay", (1, 2))
        transport = MqttTransport(settings or self.broker.settings(), analysis, node, **options)
        self.made.append(transport)
        return transport

    def join(self, analysis: str, node: str, **options: Any) -> MqttTransport:
        transport = self.make(analysis, node, **options)
        transport.connect({"state": "online"})
        return transport

    def close(self) -> None:
        for transport in self.made:
            with contextlib.suppress(Exception):
                transport.close()


@pytest.fixture
def nodes(mqtt_broker: Broker) -> Iterator[Nodes]:
    made = Nodes(mqtt_broker)
    yield made
    made.close()


@pytest.fixture
def own_nodes(fresh_broker: Broker) -> Iterator[Nodes]:
    made = Nodes(fresh_broker)
    yield made
    made.close()


# --- basics -----------------------------------------------------------------------------------


def test_round_trip(nodes: Nodes) -> None:
    analysis = unique("rt")
    alice = nodes.join(analysis, "alice")
    bob = nodes.join(analysis, "bob")
    sent = envelope(analysis, "alice", "bob", {"mean": 1.5, "n": [1, 2, 3], "a": np.arange(4.0)})
    alice.send(sent)
    got = receive_kind(bob, "result", 5)
    assert got is not None
    assert (got.id, got.sender, got.epoch, got.body["mean"]) == (sent.id, "alice", 0, 1.5)
    np.testing.assert_array_equal(got.body["a"], np.arange(4.0))
    reply = got.reply("aggregate", {"ok": True})
    bob.send(reply)
    back = receive_kind(alice, "aggregate", 5)
    assert back is not None and plain(back.body) == {"ok": True}


PROCESS_FIELDS = {"instance", "since", "gen", "seq", "at"}


def plain(status: dict[str, Any]) -> dict[str, Any]:
    """A status without what binds it to its process (every transport adds that)."""
    assert set(status) >= PROCESS_FIELDS or status == {"ok": True}, status
    return {k: v for k, v in status.items() if k not in PROCESS_FIELDS}


def test_status_watch_and_clean_close(nodes: Nodes) -> None:
    analysis = unique("st")
    alice = nodes.join(analysis, "alice")
    watcher = nodes.join(analysis, "watcher")
    watcher.watch(["alice", "bob"])
    status = receive_kind(watcher, "status", 5)
    assert status is not None
    assert (status.sender, status.recipient, status.epoch, plain(status.body)) == (
        "alice",
        "watcher",
        -1,
        {"state": "online"},
    )
    alice.announce({"state": "computing", "epoch": 2})
    status = receive_kind(watcher, "status", 5)
    assert status is not None and plain(status.body) == {"state": "computing", "epoch": 2}
    alice.close()
    status = receive_kind(watcher, "status", 5)
    assert status is not None and plain(status.body) == {"state": "offline"}
    # Statuses of nodes not watched, and of ourselves, never arrive.
    carol = nodes.join(analysis, "carol")
    carol.announce({"state": "computing"})
    assert watcher.receive(0.5) is None


def test_watch_all_sees_every_node_but_itself(nodes: Nodes) -> None:
    analysis = unique("wa")
    for node in ("node-1", "node-2", "node-3"):
        nodes.join(analysis, node)
    watcher = nodes.join(analysis, "watcher")
    watcher.watch()
    seen = set()
    while (item := watcher.receive(1.0)) is not None:
        assert item.kind == "status"
        seen.add(item.sender)
    assert seen == {"node-1", "node-2", "node-3"}


def test_send_errors_are_clear(nodes: Nodes) -> None:
    analysis = unique("err")
    transport = nodes.make(analysis, "alice", nodes.broker.settings(max_message_bytes=4096))
    with pytest.raises(TransportError, match=r"'bob'.*not connected"):
        transport.send(envelope(analysis, "alice", "bob", 1))
    transport.connect({"state": "online"})
    with pytest.raises(TransportError, match=r"message to 'bob' is .* over the broker limit"):
        transport.send(envelope(analysis, "alice", "bob", b"x" * 5000))
    with pytest.raises(TransportError, match="not a node of this analysis"):
        transport.send(envelope(analysis, "alice", "bad/topic", 1))
    with pytest.raises(TypeError, match="body"):
        transport.send(envelope(analysis, "alice", "bob", object()))


def test_send_all_delivers_each_and_awaits_every_ack_together(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broadcast publishes every message before waiting: the broker's acks overlap."""
    analysis = unique("all")
    sender = nodes.join(analysis, "alice")
    names = [f"node-{i}" for i in range(5)]
    leaves = [nodes.join(analysis, name) for name in names]
    events: list[tuple[str, str]] = []
    publish_nowait = sender.client.publish_nowait
    wait = PendingPublish.wait

    def spy_publish(topic: str, payload: bytes | bytearray, **kw: Any) -> PendingPublish:
        events.append(("publish", topic))
        return publish_nowait(topic, payload, **kw)

    def spy_wait(self: PendingPublish, timeout: float) -> None:
        events.append(("wait", self.topic))
        wait(self, timeout)

    monkeypatch.setattr(sender.client, "publish_nowait", spy_publish)
    monkeypatch.setattr(PendingPublish, "wait", spy_wait)
    bodies = [envelope(analysis, "alice", name, {"i": i}) for i, name in enumerate(names)]
    sender.send_all(bodies)
    monkeypatch.undo()
    topics = [inbox_topic(analysis, name) for name in names]
    assert events == [("publish", t) for t in topics] + [("wait", t) for t in topics]
    for i, leaf in enumerate(leaves):
        got = receive_kind(leaf, "result", 5)
        assert got is not None and got.body == {"i": i}
        assert got.wire_bytes == len(encode(got))  # the received frame's size, kept
        assert got.reply("ack").wire_bytes is None
    with pytest.raises(TransportError, match=r"'bad/topic'.*not a node of this analysis"):
        sender.send_all([envelope(analysis, "alice", "bad/topic", 1)])


def test_send_all_sends_a_large_message_in_chunks_among_small_ones(nodes: Nodes) -> None:
    analysis = unique("allbig")
    sender = nodes.make(analysis, "alice", nodes.broker.settings(chunk_size=4096))
    sender.connect({"state": "online"})
    bob, carol = nodes.join(analysis, "bob"), nodes.join(analysis, "carol")
    big = np.arange(5000.0)  # 40 kB: ten chunks
    sender.send_all(
        [envelope(analysis, "alice", "bob", {"w": big}), envelope(analysis, "alice", "carol", 1)]
    )
    got = receive_kind(bob, "result", 10)
    assert got is not None
    np.testing.assert_array_equal(got.body["w"], big)
    small = receive_kind(carol, "result", 5)
    assert small is not None and small.body == 1


def test_a_node_does_not_get_its_own_statuses_back(nodes: Nodes) -> None:
    """Its own status topic is read only after a reconnect (who holds this node now?): the
    statuses it announces do not come back to it, two deliveries per epoch saved."""
    analysis = unique("echo")
    alice = nodes.join(analysis, "alice")
    arrived: list[str] = []
    on_message = alice.client._on_message

    def spy(client: Any, userdata: Any, message: Any) -> None:
        arrived.append(message.topic)
        on_message(client, userdata, message)

    alice.client._client.on_message = spy
    for epoch in range(3):
        alice.announce({"state": "computing", "epoch": epoch})
    alice.send(envelope(analysis, "alice", "alice", 1))  # a message still arrives
    assert receive_kind(alice, "result", 5) is not None
    assert arrived == [inbox_topic(analysis, "alice")]
    assert alice.client.refresh_topics == [(f"flame/{analysis}/alice/status", 1)]


def test_client_id_is_stable_and_unambiguous() -> None:
    assert client_id_for("a", "b") == client_id_for("a", "b")
    assert client_id_for("a-b", "c") != client_id_for("a", "b-c")
    assert len(client_id_for("x" * 128, "y" * 128)) <= 128


def test_misaddressed_and_junk_frames_are_dropped(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    analysis = unique("junk")
    bob = nodes.join(analysis, "bob")
    admin = raw_client(nodes.broker)
    try:
        topic = inbox_topic(analysis, "bob")
        admin.publish(topic, encode(envelope(analysis, "alice", "carol", 1)), timeout=5)
        admin.publish(topic, encode(envelope("other", "alice", "bob", 1)), timeout=5)
        admin.publish(topic, b"\x00garbage", timeout=5)
        admin.publish(topic, b"", timeout=5)
        good = envelope(analysis, "alice", "bob", "fine")
        admin.publish(topic, encode(good), timeout=5)
        with caplog.at_level(logging.WARNING, logger="flame.transport.mqtt_receive"):
            got = bob.receive(5)
        assert got is not None and got.id == good.id
        drops = [r.getMessage() for r in caplog.records if "bob dropped" in r.getMessage()]
        # amqtt (the fallback broker) also leaks other sessions' retained statuses to bob;
        # they are dropped too. Mosquitto delivers exactly the four.
        ours = [d for d in drops if "unexpected topic" not in d]
        assert len(ours) == 4, drops
        assert bob.dropped == len(drops)
        if nodes.broker.kind == "mosquitto":
            assert len(drops) == 4
    finally:
        admin.disconnect()


# --- presence: last will ----------------------------------------------------------------------

CHILD = """
import os, sys, time
from flame.config import BrokerSettings
from flame.transport.mqtt import MqttTransport
settings = BrokerSettings(url=os.environ["T_URL"], token=os.environ["T_TOKEN"], keepalive=10)
transport = MqttTransport(settings, os.environ["T_ANALYSIS"], os.environ["T_NODE"])
transport.connect({"state": "online", "pid": os.getpid()})
print("READY", flush=True)
time.sleep(120)
"""


def start_child(broker: Broker, analysis: str, node: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(T_URL=broker.url, T_TOKEN=broker.password, T_ANALYSIS=analysis, T_NODE=node)
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    return process


def wait_ready(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    assert process.stdout is not None
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not result or not result[0].startswith(b"READY"):
        process.kill()
        _, err = process.communicate(timeout=10)
        raise AssertionError(f"child did not start: {err.decode()[-2000:]}")


def test_last_will_marks_a_killed_node_offline(nodes: Nodes) -> None:
    analysis = unique("will")
    watcher = nodes.join(analysis, "watcher")
    watcher.watch(["crasher"])
    child = start_child(nodes.broker, analysis, "crasher")
    try:
        wait_ready(child)
        online = receive_kind(watcher, "status", 10)
        assert online is not None and online.body["state"] == "online"
        assert online.body["pid"] == child.pid
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        offline = receive_kind(watcher, "status", 10)
        assert offline is not None and plain(offline.body) == {"state": "offline"}
        # The retained status is what a node that starts watching now sees, too.
        late = nodes.join(analysis, "receiver")
        late.watch(["crasher"])
        retained = receive_kind(late, "status", 5)
        assert retained is not None and plain(retained.body) == {"state": "offline"}
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def test_kill_fires_the_will_in_process(nodes: Nodes) -> None:
    analysis = unique("kill")
    watcher = nodes.join(analysis, "watcher")
    watcher.watch(["alice"])
    alice = nodes.join(analysis, "alice")
    assert receive_kind(watcher, "status", 5) is not None
    alice.kill()
    offline = receive_kind(watcher, "status", 5)
    assert offline is not None and plain(offline.body) == {"state": "offline"}


def test_reconnect_republishes_the_status_after_the_will(own_nodes: Nodes) -> None:
    """A dropped connection fires the will; the node's status must come back when it does."""
    broker = own_nodes.broker
    analysis = unique("birth")
    alice = own_nodes.join(analysis, "alice")
    alice.announce({"state": "computing", "epoch": 3})
    watcher = own_nodes.join(analysis, "watcher")
    watcher.watch(["alice"])
    assert receive_kind(watcher, "status", 5) is not None
    # Cut alice's TCP connection under her feet (the broker sees a dead client).
    sock = alice.client._client.socket()
    assert sock is not None
    import socket as _socket

    assert isinstance(sock, _socket.socket)
    sock.shutdown(_socket.SHUT_RDWR)
    states = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        item = watcher.receive(0.5)
        if item is not None and item.kind == "status":
            states.append(plain(item.body))
            if item.body.get("state") == "computing" and {"state": "offline"} in states:
                break
    assert {"state": "offline"} in states
    assert states[-1] == {"state": "computing", "epoch": 3}
    assert broker.running


# --- persistent sessions ------------------------------------------------------------------------


def test_message_sent_while_recipient_is_away_arrives_after_it_returns(nodes: Nodes) -> None:
    if not nodes.broker.queues_offline:
        pytest.skip("amqtt does not deliver messages queued for an offline session")
    analysis = unique("away")
    bob = nodes.join(analysis, "bob")
    bob.close()
    alice = nodes.join(analysis, "alice")
    sent = [envelope(analysis, "alice", "bob", i, epoch=i) for i in range(5)]
    for item in sent:
        alice.send(item)
    again = nodes.join(analysis, "bob")
    got = [again.receive(5) for _ in sent]
    assert [g.id for g in got if g is not None] == [s.id for s in sent]


def test_messages_held_by_a_killed_process_are_not_lost(nodes: Nodes) -> None:
    """Delivered to the process but never taken by receive(): not acknowledged, so redelivered."""
    if not nodes.broker.queues_offline:
        pytest.skip("amqtt does not deliver messages queued for an offline session")
    analysis = unique("held")
    child = start_child(nodes.broker, analysis, "receiver")
    try:
        wait_ready(child)
        alice = nodes.join(analysis, "alice")
        sent = [envelope(analysis, "alice", "receiver", i) for i in range(5)]
        for item in sent:
            alice.send(item)
        time.sleep(0.5)  # the broker pushes them into the child's (unread) queue
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    restarted = nodes.join(analysis, "receiver")
    ids = set()
    while (item := restarted.receive(3)) is not None:
        ids.add(item.id)
        if ids >= {s.id for s in sent}:
            break
    assert ids == {s.id for s in sent}


def _stream(
    broker: Broker,
    own: Nodes,
    *,
    count: int,
    restarts: int,
    kill: bool,
) -> tuple[list[str], set[str], int]:
    analysis = unique("stream")
    receiver = own.join(analysis, "receiver")
    sender = own.join(analysis, "sender")
    sent: list[str] = []
    received: set[str] = set()
    duplicates = 0
    stop = threading.Event()
    errors: list[BaseException] = []

    def consume() -> None:
        nonlocal duplicates
        try:
            while not stop.is_set() or len(received) < len(sent):
                item = receiver.receive(0.2)
                if item is None:
                    if stop.is_set() and len(received) >= len(sent):
                        return
                    continue
                if item.kind != "result":
                    continue
                if item.id in received:
                    duplicates += 1
                received.add(item.id)
        except BaseException as exc:
            errors.append(exc)

    def produce() -> None:
        try:
            for i in range(count):
                item = envelope(analysis, "sender", "receiver", {"i": i}, epoch=i)
                sender.send(item, timeout=20)
                sent.append(item.id)
                time.sleep(0.004)
        except BaseException as exc:
            errors.append(exc)

    consumer = threading.Thread(target=consume)
    producer = threading.Thread(target=produce)
    consumer.start()
    producer.start()
    progress = []
    for _ in range(restarts):
        # Restart only once the stream is flowing again, so every restart hits live traffic.
        target = len(sent) + 40
        deadline = time.monotonic() + 20
        while len(sent) < target and time.monotonic() < deadline and producer.is_alive():
            time.sleep(0.01)
        progress.append(len(sent))
        broker.restart(kill=kill)
    producer.join(90)
    assert progress[-1] < count, f"the stream ended before the last restart: {progress}"
    assert progress[0] > 0, "the first restart came before the stream started"
    print(f"messages sent at each restart: {progress}")
    deadline = time.monotonic() + 30
    while len(received) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    consumer.join(30)
    assert not errors, errors
    return sent, received, duplicates


def test_broker_restarted_mid_stream_loses_nothing(
    own_nodes: Nodes, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = own_nodes.broker
    if not broker.persistent:
        pytest.skip("amqtt keeps no sessions across a restart")
    sent, received, duplicates = _stream(broker, own_nodes, count=300, restarts=3, kill=False)
    missing = set(sent) - received
    say(
        capsys,
        f"broker restarts: 3 (SIGTERM), sent {len(sent)}, received {len(received)}, "
        f"missing {len(missing)}, duplicates {duplicates}",
    )
    assert len(sent) == 300
    assert not missing


def test_broker_sigkilled_mid_stream_loses_nothing(
    fresh_broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL: the broker cannot save on the way out; it saves after every change instead."""
    if not fresh_broker.persistent:
        pytest.skip("amqtt keeps no sessions across a restart")
    fresh_broker.close()
    with Broker(save_every_change=True) as broker:
        own = Nodes(broker)
        try:
            sent, received, duplicates = _stream(broker, own, count=300, restarts=3, kill=True)
        finally:
            own.close()
    missing = set(sent) - received
    say(
        capsys,
        f"broker restarts: 3 (SIGKILL), sent {len(sent)}, received {len(received)}, "
        f"missing {len(missing)}, duplicates {duplicates}",
    )
    assert len(sent) == 300
    assert not missing


# --- large frames -------------------------------------------------------------------------------


def test_chunked_numpy_frame_is_reassembled_equal(nodes: Nodes) -> None:
    analysis = unique("big")
    settings = nodes.broker.settings(chunk_size=256 * 1024)
    alice = nodes.join(analysis, "alice", settings=settings)
    bob = nodes.join(analysis, "bob", settings=settings)
    rng = np.random.default_rng(7)
    weights = rng.standard_normal(1_500_000)  # 12 MB
    counts = rng.integers(0, 1000, size=(1000, 250), dtype=np.int32)  # 1 MB
    sent = envelope(analysis, "alice", "bob", {"w": weights, "c": counts, "note": "big"})
    started = time.perf_counter()
    alice.send(sent)
    got = receive_kind(bob, "result", 30)
    elapsed = time.perf_counter() - started
    assert got is not None and got.id == sent.id
    np.testing.assert_array_equal(got.body["w"], weights)
    np.testing.assert_array_equal(got.body["c"], counts)
    assert got.body["w"].flags.writeable, "arrays should be views of the reassembled bytearray"
    got.body["w"][0] = 1.0  # and usable in place
    assert bob._reassembler.open_transfers == 0 and bob._reassembler.pending_bytes == 0
    print(f"13 MB frame in {256 * 1024 // 1024} KiB chunks: {elapsed:.2f} s")


def raw_client(broker: Broker) -> MessageBrokerClient:
    client = MessageBrokerClient(
        broker.url,
        client_id=f"raw-{time.monotonic_ns()}",
        username=ADMIN,
        password=lambda: broker.password,
        connect_timeout=5,
    )
    client.connect()
    return client


def chunks_of(item: Envelope, piece: int) -> list[bytearray]:
    parts: list[Buffer] = list(encode_parts(item))
    return list(split_frame(parts, piece))


def test_chunks_out_of_order_and_duplicated_are_reassembled(nodes: Nodes) -> None:
    analysis = unique("shuffle")
    bob = nodes.join(analysis, "bob")
    sent = envelope(analysis, "alice", "bob", np.arange(50_000, dtype=np.float64))
    chunks = chunks_of(sent, 16 * 1024)
    order = [*reversed(chunks), chunks[3], chunks[0]]
    admin = raw_client(nodes.broker)
    try:
        for chunk in order:
            admin.publish(inbox_topic(analysis, "bob"), chunk, timeout=5)
        got = bob.receive(5)
        assert got is not None and got.id == sent.id
        np.testing.assert_array_equal(got.body, np.arange(50_000, dtype=np.float64))
        assert bob.receive(0.3) is None, "late duplicates of a finished transfer are ignored"
    finally:
        admin.disconnect()


def test_incomplete_reassembly_is_dropped_after_the_timeout(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    analysis = unique("partial")
    bob = nodes.join(analysis, "bob", reassembly_timeout=0.5)
    sent = envelope(analysis, "alice", "bob", np.ones(100_000))
    chunks = chunks_of(sent, 64 * 1024)
    admin = raw_client(nodes.broker)
    try:
        for chunk in chunks[:-1]:  # the last chunk never comes
            admin.publish(inbox_topic(analysis, "bob"), chunk, timeout=5)
        assert bob.receive(0.3) is None
        assert bob._reassembler.open_transfers == 1
        assert bob._reassembler.pending_bytes == len(encode(sent))
        with caplog.at_level(logging.WARNING, logger="flame.transport.mqtt_receive"):
            assert bob.receive(0.5) is None
            time.sleep(0.2)
            assert bob.receive(0.1) is None
        assert bob._reassembler.open_transfers == 0
        assert bob._reassembler.pending_bytes == 0, "the buffer is released"
        assert any("dropped an incomplete transfer" in r.getMessage() for r in caplog.records)
        # The straggler arriving now is ignored, and normal traffic flows.
        admin.publish(inbox_topic(analysis, "bob"), chunks[-1], timeout=5)
        good = envelope(analysis, "alice", "bob", "after")
        admin.publish(inbox_topic(analysis, "bob"), encode(good), timeout=5)
        got = bob.receive(5)
        assert got is not None and got.id == good.id
    finally:
        admin.disconnect()


def test_corrupted_chunk_fails_the_checksum(nodes: Nodes, caplog: pytest.LogCaptureFixture) -> None:
    analysis = unique("corrupt")
    bob = nodes.join(analysis, "bob")
    sent = envelope(analysis, "alice", "bob", np.ones(20_000))
    chunks = chunks_of(sent, 32 * 1024)
    chunks[1][-1] ^= 0xFF
    admin = raw_client(nodes.broker)
    try:
        with caplog.at_level(logging.WARNING, logger="flame.transport.mqtt_receive"):
            for chunk in chunks:
                admin.publish(inbox_topic(analysis, "bob"), chunk, timeout=5)
            assert bob.receive(1.0) is None
        assert any("SHA-256" in r.getMessage() for r in caplog.records)
    finally:
        admin.disconnect()


class DictClaimCheck:
    """A claim check in a dict, standing in for object storage."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put(self, parts: list[Buffer], size: int, sha256: bytes) -> str:
        reference = f"mem://{sha256.hex()}"
        self.objects[reference] = b"".join(parts)
        return reference

    def fetch(self, reference: str, size: int) -> bytearray:
        return bytearray(self.objects[reference])


def test_claim_check_seam_carries_only_a_reference(nodes: Nodes) -> None:
    analysis = unique("claim")
    store = DictClaimCheck()
    alice = nodes.join(analysis, "alice", claim_check=store, claim_check_threshold=10_000)
    bob = nodes.join(analysis, "bob", claim_check=store)
    payload = np.arange(100_000, dtype=np.int64)
    sent = envelope(analysis, "alice", "bob", payload)
    alice.send(sent)
    got = receive_kind(bob, "result", 5)
    assert got is not None and got.id == sent.id
    np.testing.assert_array_equal(got.body, payload)
    assert len(store.objects) == 1
    frame = next(iter(store.objects.values()))
    assert hashlib.sha256(frame).hexdigest() in next(iter(store.objects))
    # Small messages still travel inline.
    alice.send(envelope(analysis, "alice", "bob", "small"))
    assert len(store.objects) == 1
    # A receiver without the claim check drops the reference with a log line.
    carol = nodes.join(analysis, "carol")
    alice.send(envelope(analysis, "alice", "carol", payload))
    assert carol.receive(1.0) is None and carol.dropped == 1


# --- credentials and identity -------------------------------------------------------------------


def test_token_file_is_used_and_a_wrong_one_is_refused_clearly(nodes: Nodes, tmp_path: Any) -> None:
    if not nodes.broker.supports_acl:
        pytest.skip("amqtt runs without a password file")
    analysis = unique("tokfile")
    token_file = tmp_path / "broker-token"
    token_file.write_text(nodes.broker.password + "\n")
    settings = nodes.broker.settings(token=None, token_file=token_file)
    alice = nodes.make(analysis, "alice", settings)
    alice.connect({"state": "online"})
    alice.close()
    token_file.write_text("not-the-token-" + "x" * 20)
    again = nodes.make(analysis, "alice", settings)
    with pytest.raises(TransportError) as info:
        again.connect({"state": "online"})
    text = str(info.value)
    assert f"broker mqtt://127.0.0.1:{nodes.broker.port} refused the connection" in text
    assert "not-the-token" not in text and nodes.broker.password not in text


def test_a_node_cannot_speak_for_another(nodes: Nodes) -> None:
    """User mallory claiming node id alice: the broker refuses her 'alice' status (ACL)."""
    if not nodes.broker.supports_acl:
        pytest.skip("ACLs need mosquitto (amqtt fallback has none)")
    analysis = unique("spoof")
    settings = nodes.broker.settings(username="mallory")
    spoof = nodes.make(analysis, "alice", settings)
    with pytest.raises(TransportError, match=r"could not announce its status.*not authorized"):
        spoof.connect({"state": "online"})


def test_close_then_connect_again(nodes: Nodes) -> None:
    analysis = unique("again")
    alice = nodes.join(analysis, "alice")
    bob = nodes.join(analysis, "bob")
    alice.close()
    alice.connect({"state": "back"})
    alice.send(envelope(analysis, "alice", "bob", "after reconnect"))
    got = receive_kind(bob, "result", 5)
    assert got is not None and got.body == "after reconnect"

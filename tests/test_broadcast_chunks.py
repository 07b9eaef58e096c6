"""A broadcast over `chunk_size` (or a claim check's threshold) on a real broker: it goes out
once, as chunks whose manifest is signed for EVERYONE (or one stored copy), and nothing else
gets through the broadcast topic as chunks: forged, foreign, per-recipient or incomplete
transfers are dropped and the node keeps working."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from broker import Broker
from test_attacks_broadcast import admin
from test_broadcast import Federation, kinds

from flame.transport.mqtt import MqttTransport, broadcast_topic, inbox_topic
from flame.wire.chunks import chunk_header_size, split_frame
from flame.wire.envelope import EVERYONE, Envelope

CHUNK = 4096
MODEL = 40_000  # float64 values: a 320 KB aggregate, about 80 chunks


class SmallChunks(Federation):
    """Transports with `chunk_size` 4096; signed (roster) or unsigned."""

    def __init__(self, broker: Broker, nodes: list[str], *, signed: bool = True) -> None:
        super().__init__(broker, nodes)
        self.signed = signed

    def transport(self, node: str) -> MqttTransport:
        made = super().transport(node)
        made.settings = self.broker.settings(chunk_size=CHUNK)
        made._claim_check_threshold = CHUNK
        if not self.signed:
            made.auth = None
        return made


@pytest.fixture(params=[True, False], ids=["signed", "unsigned"])
def fed(request: Any, mqtt_broker: Broker) -> Iterator[SmallChunks]:
    made = SmallChunks(mqtt_broker, ["alice", "bob", "carol"], signed=request.param)
    yield made
    made.close()


@pytest.fixture
def signed_fed(mqtt_broker: Broker) -> Iterator[SmallChunks]:
    made = SmallChunks(mqtt_broker, ["alice", "bob", "carol"])
    yield made
    made.close()


def model_kickoff(analysis: str, seed: int = 1) -> Envelope:
    value = np.random.default_rng(seed).normal(size=MODEL)
    return Envelope(analysis, "aggregator", EVERYONE, "aggregate", 3, {"value": value})


def arrays(transport: MqttTransport, seconds: float) -> list[np.ndarray]:
    return [body["value"] for kind, body in kinds(transport, seconds) if kind == "aggregate"]


def chunks_of(signer: MqttTransport, envelope: Envelope, recipient: str) -> list[bytes]:
    """`envelope` as the chunks `signer` would publish, its manifest signed for `recipient`."""
    parts = signer.outgoing(replace(envelope, recipient=recipient))
    auth = signer.auth
    sign = None if auth is None else auth.chunk_signer(signer.analysis_id, recipient)
    piece = CHUNK - chunk_header_size(None if auth is None else signer.node_id)
    return [bytes(c) for c in split_frame(parts, piece, sign=sign)]


def held(transport: MqttTransport) -> int:
    """Bytes held for partly received broadcasts."""
    reassembler = getattr(transport, "_broadcast_reassembler", None)
    return 0 if reassembler is None else int(reassembler.pending_bytes)


def publish_all(client: Any, topic: str, payloads: list[bytes]) -> None:
    for payload in payloads:
        client.publish(topic, payload, qos=1).wait_for_publish(5)


def test_a_kick_off_over_chunk_size_goes_out_once(fed: SmallChunks) -> None:
    aggregator = fed.join("aggregator", broadcasts=False)
    nodes = {n: fed.join(n) for n in ("alice", "bob", "carol")}
    envelope = model_kickoff(fed.analysis)
    one_copy = sum(len(p) for p in aggregator.outgoing(envelope))
    assert one_copy > 50 * CHUNK
    before = aggregator.bytes_sent
    aggregator.broadcast(envelope, list(nodes)).wait()
    sent = aggregator.bytes_sent - before
    assert sent < 1.2 * one_copy, f"{sent} bytes out for a {one_copy}-byte kick-off"
    for node, transport in nodes.items():
        got = arrays(transport, 3.0)
        assert len(got) == 1, node
        assert np.array_equal(got[0], envelope.body["value"]), node
        assert held(transport) == 0


def test_forged_foreign_and_per_recipient_chunks_on_the_broadcast_topic_are_dropped(
    signed_fed: SmallChunks,
) -> None:
    fed = signed_fed
    alice = fed.join("alice")
    bob = fed.join("bob")
    genuine = fed.transport("aggregator")  # the aggregator's key, never connected
    carol = fed.transport("carol")  # an analysis member: may not send kick-offs
    envelope = model_kickoff(fed.analysis)
    topic = broadcast_topic(fed.analysis)
    unsigned = SmallChunks(fed.broker, ["alice"], signed=False).transport("aggregator")
    client = admin(fed.broker)
    try:
        # chunks signed for alice (a genuine per-recipient message) replayed on the topic
        publish_all(
            client, topic, chunks_of(genuine, replace(envelope, recipient="alice"), "alice")
        )
        # the aggregator's kick-off, but its manifest signed for one node, not EVERYONE
        publish_all(client, topic, chunks_of(genuine, envelope, "alice"))
        # signed for EVERYONE by a member whose role may not broadcast
        publish_all(client, topic, chunks_of(carol, replace(envelope, sender="carol"), EVERYONE))
        # unsigned chunks
        publish_all(client, topic, chunks_of(unsigned, envelope, EVERYONE))
        # a genuine broadcast's chunks copied into alice's inbox
        publish_all(
            client, inbox_topic(fed.analysis, "alice"), chunks_of(genuine, envelope, EVERYONE)
        )
        assert kinds(alice, 2.0) == []
        assert kinds(bob, 0.3) == []
        assert alice.dropped >= 5 and bob.dropped >= 4
        for node in (alice, bob):
            assert held(node) == 0
            assert node._reassembler.pending_bytes == 0
        # mixed: a forged chunk inside a genuine transfer (its id, another seal) is dropped,
        # and the genuine broadcast still arrives whole
        real = chunks_of(genuine, envelope, EVERYONE)
        forged = chunks_of(carol, replace(envelope, sender="carol"), EVERYONE)
        mixed = bytearray(forged[1])
        mixed[4:20] = real[0][4:20]  # the genuine transfer id
        publish_all(client, topic, [real[0], bytes(mixed), *real[1:]])
        for node in (alice, bob):
            got = arrays(node, 3.0)
            assert len(got) == 1 and np.array_equal(got[0], envelope.body["value"])
    finally:
        client.loop_stop()
        client.disconnect()


def test_a_node_that_misses_chunks_drops_the_partial_and_takes_the_next(
    signed_fed: SmallChunks,
) -> None:
    fed = signed_fed
    alice = fed.transport("alice")
    for reassembler in (alice._reassembler, getattr(alice, "_broadcast_reassembler", None)):
        if reassembler is not None:
            reassembler.timeout = 1.0
    alice.take_broadcasts()
    alice.connect({"state": "waiting"})
    genuine = fed.transport("aggregator")
    topic = broadcast_topic(fed.analysis)
    client = admin(fed.broker)
    try:
        first = model_kickoff(fed.analysis, seed=1)
        # joined mid-stream: the first half of the transfer never reached this node
        real = chunks_of(genuine, first, EVERYONE)
        publish_all(client, topic, real[len(real) // 2 :])
        assert kinds(alice, 0.5) == []
        assert held(alice) > 0  # held, within the limits
        time.sleep(1.2)
        assert kinds(alice, 0.3) == []
        assert held(alice) == 0  # dropped after the timeout
        # the rest of the old transfer, arriving late, does not open it again
        publish_all(client, topic, real[: len(real) // 2])
        assert kinds(alice, 0.5) == []
        second = model_kickoff(fed.analysis, seed=2)
        publish_all(client, topic, chunks_of(genuine, second, EVERYONE))
        got = arrays(alice, 3.0)
        assert len(got) == 1 and np.array_equal(got[0], second.body["value"])
    finally:
        client.loop_stop()
        client.disconnect()


def test_a_claim_checked_broadcast_is_stored_once(
    fresh_broker: Broker, s3_server: Any, s3_bucket: str
) -> None:
    from flame.clients.minio_client import MinioStore
    from flame.clients.object_store import AnalysisLayout
    from flame.config import StorageSettings
    from flame.transport.claim_check import StorageClaimCheck

    store = MinioStore.from_settings(StorageSettings(**s3_server.settings(bucket=s3_bucket)))
    fed = SmallChunks(fresh_broker, ["alice", "bob", "carol"])
    layout = AnalysisLayout(fed.analysis)

    def join(node: str, broadcasts: bool = True) -> MqttTransport:
        made = fed.transport(node)
        made._claim_check = StorageClaimCheck(store, fed.analysis, node)
        if broadcasts:
            made.take_broadcasts()
        made.connect({"state": "waiting"})
        return made

    try:
        aggregator = join("aggregator", broadcasts=False)
        nodes = [join(n) for n in ("alice", "bob", "carol")]
        envelope = model_kickoff(fed.analysis)
        aggregator.broadcast(envelope, ["alice", "bob", "carol"]).wait()
        for node in nodes:
            got = arrays(node, 5.0)
            assert len(got) == 1 and np.array_equal(got[0], envelope.body["value"])
        assert len(store.list(layout.root + "payloads/aggregator/")) == 1
    finally:
        fed.close()


# --- a whole run, in threads: the aggregate of every epoch reaches every node once ----------


def _analyze(data: Any, epoch: int, previous: Any) -> Any:
    saw = None if previous is None else float(np.asarray(previous["w"]).sum())
    return {"w": np.full(MODEL, float(epoch + 1)), "saw": saw}


def _aggregate(results: Any, epoch: int, previous: Any) -> Any:
    w = sum(np.asarray(r["w"]) for r in results.values())
    return {"w": w, "saw": {n: r["saw"] for n, r in sorted(results.items())}}


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_a_run_sends_each_large_aggregate_once(mqtt_broker: Broker, signed: bool) -> None:
    from flame.aggregator.run_store import MemoryState
    from flame.aggregator.server import Aggregator
    from flame.analysis.functions import AnalysisFunctions
    from flame.data import Data, MemorySource
    from flame.node.runtime import AnalysisClient

    nodes = ["alice", "bob", "carol"]
    fed = SmallChunks(mqtt_broker, nodes, signed=signed)
    functions = AnalysisFunctions.of(_analyze, _aggregate, None)
    failures: list[str] = []

    def run(node: str) -> None:
        client = AnalysisClient(
            fed.transport(node),
            aggregator_id="aggregator",
            participants=nodes,
            wait_timeout=120,
            state=MemoryState(),
        )
        try:
            client.run(functions, Data({"m": MemorySource({"d.txt": b"1"})}, node_id=node))
        except Exception as exc:
            failures.append(f"{node}: {exc}")

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in nodes]
    for thread in threads:
        thread.start()
    epochs = 5
    try:
        result = Aggregator(
            fed.transport("aggregator"),
            functions,
            participants=nodes,
            epochs=epochs,
            epoch_timeout=120,
            presence_timeout=60,
        ).execute()
    finally:
        for thread in threads:
            thread.join(60)
        fed.close()
    assert not failures, failures
    # every node saw the previous aggregate: 3 nodes x epoch number x MODEL
    assert result.value["saw"] == {n: float(3 * (epochs - 1) * MODEL) for n in nodes}
    one_copy = MODEL * 8
    kickoffs = [record.bytes_sent for record in result.history[:-1]]  # the next epoch's
    # once the nodes have said a broadcast reaches them (after the first kick-off's probe),
    # each kick-off leaves the aggregator once, not once per node
    assert all(sent > one_copy for sent in kickoffs), kickoffs
    assert kickoffs[-1] < 1.5 * one_copy, kickoffs
    assert sum(kickoffs) < (len(nodes) * len(kickoffs) - 1) * one_copy, kickoffs

"""Claim check over a real broker and a real S3 server: a frame above the threshold goes to
storage, the broker carries only a reference, and the receiver gets the whole frame back."""

from __future__ import annotations

import numpy as np
from broker import Broker
from servers.s3_server import S3Server

from flame.clients.minio_client import MinioStore
from flame.clients.object_store import AnalysisLayout
from flame.config import StorageSettings
from flame.transport.claim_check import StorageClaimCheck, _PartsReader
from flame.transport.mqtt import MqttTransport
from flame.wire.envelope import Envelope


def test_parts_reader_reads_and_seeks_across_buffers() -> None:
    parts = [b"abc", memoryview(b"defgh"), b"", b"ij"]
    reader = _PartsReader(parts)
    assert reader.read() == b"abcdefghij"
    reader.seek(2)
    assert reader.read(4) == b"cdef"
    assert reader.seek(-3, 2) == 7
    assert reader.read() == b"hij"


def test_large_frame_travels_through_storage(
    fresh_broker: Broker, s3_server: S3Server, s3_bucket: str
) -> None:
    store = MinioStore.from_settings(StorageSettings(**s3_server.settings(bucket=s3_bucket)))
    settings = fresh_broker.settings(chunk_size=64 * 1024)
    sender = MqttTransport(
        settings, "claims", "alice", claim_check=StorageClaimCheck(store, "claims", "alice")
    )
    receiver = MqttTransport(
        settings, "claims", "bob", claim_check=StorageClaimCheck(store, "claims", "bob")
    )
    receiver.connect({"state": "waiting"})
    sender.connect({"state": "waiting"})
    try:
        update = np.random.default_rng(3).normal(size=(500, 300))  # 1.2 MB
        sender.send(Envelope("claims", "alice", "bob", "result", 0, {"update": update}))
        got = receiver.receive(timeout=30)
        while got is not None and got.kind == "status":
            got = receiver.receive(timeout=30)
        assert got is not None and got.sender == "alice"
        assert np.array_equal(got.body["update"], update)
        stored = store.list(AnalysisLayout("claims").root + "payloads/alice/")
        assert len(stored) == 1
    finally:
        sender.close()
        receiver.close()

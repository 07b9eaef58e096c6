"""Object storage: MinioStore against a real S3 server (moto), FileStore on a temp folder."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from servers.s3_server import S3Server, free_port

from flame.clients.file_store import FileStore
from flame.clients.minio_client import MinioStore, open_store, parse_endpoint
from flame.clients.object_store import (
    AnalysisLayout,
    IntegrityError,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    validate_key,
)
from flame.config import StorageSettings

pytest_plugins = ["servers.plugin"]

MB = 1024 * 1024


def minio_store(server: S3Server, bucket: str, prefix: str = "runs/") -> MinioStore:
    store = MinioStore.from_settings(
        StorageSettings(**server.settings(bucket=bucket, prefix=prefix))
    )
    assert isinstance(store, MinioStore)
    return store


@pytest.fixture(params=["minio", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "minio":
        server: S3Server = request.getfixturevalue("s3_server")
        made: ObjectStore = minio_store(server, request.getfixturevalue("s3_bucket"))
    else:
        made = FileStore(tmp_path / "store")
    made.ensure_bucket()
    made.ensure_bucket()  # idempotent
    made.probe()
    yield made


class OneWayStream(io.RawIOBase):
    """A non-seekable stream (like a socket or a pipe)."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._fail_at = fail_at

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._fail_at is not None and self._pos >= self._fail_at:
            raise OSError("stream broke")
        n = min(len(buffer), len(self._data) - self._pos, 64 * 1024)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


# ------------------------------------------------------------------------- both stores


def test_round_trip_with_sha256(store: ObjectStore) -> None:
    data = b"epoch 3 result \x00\xff" * 100
    stored = store.put_bytes("a1/epochs/000003/n1.bin", data, {"node": "n1", "kind": "result"})
    assert stored.sha256 == hashlib.sha256(data).hexdigest() and stored.size == len(data)
    assert stored.key == "a1/epochs/000003/n1.bin"
    assert store.get_bytes("a1/epochs/000003/n1.bin") == data
    info = store.stat("a1/epochs/000003/n1.bin")
    assert (info.sha256, info.size) == (stored.sha256, len(data))
    assert dict(info.metadata) == {"node": "n1", "kind": "result"}
    store.put_bytes("a1/empty", b"")
    assert store.get_bytes("a1/empty") == b""


def test_json_helpers(store: ObjectStore) -> None:
    value = {"epoch": 2, "nodes": ["n1", "n2"], "mean": 71.25, "note": "r\u00e9sum\u00e9"}
    store.put_json("a1/epochs/000002/checkpoint.json", value)
    assert store.get_json("a1/epochs/000002/checkpoint.json") == value
    with pytest.raises(StorageError, match="not JSON-serialisable"):
        store.put_json("a1/bad.json", {"x": float("nan")})
    store.put_bytes("a1/not.json", b"{nope")
    with pytest.raises(StorageError, match="not valid JSON"):
        store.get_json("a1/not.json")


def test_list_exists_delete(store: ObjectStore) -> None:
    for key in ["a1/epochs/000000/n1.bin", "a1/epochs/000000/n2.bin", "a1/final/result.bin", "b/x"]:
        store.put_bytes(key, key.encode())
    assert store.list("a1/") == [
        "a1/epochs/000000/n1.bin",
        "a1/epochs/000000/n2.bin",
        "a1/final/result.bin",
    ]
    assert store.list() == [*store.list("a1/"), "b/x"]
    assert store.list("a1/epochs/000000/n") == [
        "a1/epochs/000000/n1.bin",
        "a1/epochs/000000/n2.bin",
    ]
    assert store.exists("b/x") and not store.exists("b/y")
    store.delete("b/x")
    store.delete("b/x")  # deleting a missing object is fine
    assert not store.exists("b/x")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("b/x")
    with pytest.raises(ObjectNotFound):
        store.stat("b/x")


def test_large_streamed_put_and_get(store: ObjectStore, tmp_path: Path) -> None:
    update = np.random.default_rng(7).standard_normal(20 * MB // 8)  # a 20 MB numpy update
    stored = store.put_bytes("a1/epochs/000001/big.bin", update)
    assert stored.size == update.nbytes
    back = np.frombuffer(store.get_bytes("a1/epochs/000001/big.bin"), dtype=np.float64)
    np.testing.assert_array_equal(back, update)

    raw = update.tobytes()
    grid = update[: 1000 * 64].reshape(1000, 64)
    assert store.put_bytes("a1/grid.bin", grid).size == grid.nbytes
    assert store.get_bytes("a1/grid.bin") == grid.tobytes()
    store.put_bytes("a1/strided.bin", grid[:, ::2])  # not contiguous: copied once
    assert store.get_bytes("a1/strided.bin") == grid[:, ::2].tobytes()
    with pytest.raises(StorageError, match="Python objects"):
        store.put_bytes("a1/objects.bin", np.array([{}, []], dtype=object))
    streamed = store.put_stream("a1/streamed.bin", OneWayStream(raw))  # type: ignore[arg-type]
    assert streamed.sha256 == stored.sha256
    source = tmp_path / "upload.bin"
    source.write_bytes(raw)
    assert store.put_file("a1/from-file.bin", source).sha256 == stored.sha256
    target = tmp_path / "out" / "download.bin"
    got = store.get_to_file("a1/streamed.bin", target)
    assert got.sha256 == stored.sha256 and target.read_bytes() == raw
    assert [p.name for p in target.parent.iterdir()] == ["download.bin"]  # no temp debris


def test_bad_keys_are_refused(store: ObjectStore) -> None:
    for key in [
        "",
        "/abs",
        "../escape",
        "a/../../b",
        "a//b",
        ".flame-index/x",
        "a/.hidden",
        "a\\b",
        "a/",
    ]:
        with pytest.raises(StorageError, match="invalid object key"):
            store.put_bytes(key, b"x")
    with pytest.raises(StorageError, match="invalid metadata name"):
        store.put_bytes("ok", b"x", {"Bad Name": "v"})
    with pytest.raises(StorageError, match="printable ASCII"):
        store.put_bytes("ok", b"x", {"name": "caf\u00e9"})


def test_layout_with_store(store: ObjectStore) -> None:
    layout = AnalysisLayout("study-42")
    assert layout.epoch_result(3, "node-1") == "study-42/epochs/000003/node-1.bin"
    assert layout.checkpoint(3) == "study-42/epochs/000003/checkpoint.json"
    assert layout.final_result() == "study-42/final/result.bin"
    assert layout.manifest() == "study-42/final/manifest.json"
    assert layout.node_state("node-1", "model") == "study-42/nodes/node-1/state/model"
    assert layout.payload("node-1", "m-123") == "study-42/payloads/node-1/m-123.bin"
    assert layout.latest_checkpoint(store) is None
    for epoch in (0, 1, 2):
        store.put_json(layout.checkpoint(epoch), {"epoch": epoch})
        for node in ("node-1", "node-2"):
            store.put_bytes(layout.epoch_result(epoch, node), f"{epoch}{node}".encode())
    store.put_bytes(layout.node_state("node-1", "model"), b"fitted")
    store.put_json(AnalysisLayout("other-run").checkpoint(9), {})
    assert layout.checkpointed_epochs(store) == [0, 1, 2]
    assert layout.latest_checkpoint(store) == 2
    assert layout.epoch_results(store, 1) == {
        "node-1": "study-42/epochs/000001/node-1.bin",
        "node-2": "study-42/epochs/000001/node-2.bin",
    }
    assert layout.node_states(store, "node-1") == ["model"]
    assert AnalysisLayout("other-run").latest_checkpoint(store) == 9
    bad_calls: list[Callable[[], object]] = [
        lambda: AnalysisLayout("../x"),
        lambda: layout.node_state("n", "a/b"),
        lambda: layout.epoch_result(-1, "n"),
        lambda: layout.epoch_result(1, "checkpoint"),
    ]
    for bad in bad_calls:
        with pytest.raises(StorageError):
            bad()


# ----------------------------------------------------------------------------- MinioStore


def test_minio_tampered_object_is_detected(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    store = minio_store(s3_server, s3_bucket)
    store.ensure_bucket()
    stored = store.put_bytes("a1/final/result.bin", b"the real result")
    raw = s3_server.client()
    fake = b"a forged result"
    # Overwrite the bytes but keep the recorded checksum, as an attacker or a bug would.
    raw.put_object(
        s3_bucket,
        "runs/a1/final/result.bin",
        io.BytesIO(fake),
        len(fake),
        metadata={"flame-sha256": stored.sha256},
    )
    with pytest.raises(IntegrityError, match=r"runs/a1/final/result\.bin: SHA-256 mismatch"):
        store.get_bytes("a1/final/result.bin")
    target = tmp_path / "result.bin"
    with pytest.raises(IntegrityError):
        store.get_to_file("a1/final/result.bin", target)
    assert list(tmp_path.iterdir()) == []  # nothing half-verified left behind
    raw.put_object(s3_bucket, "runs/a1/unsigned", io.BytesIO(b"x"), 1)
    with pytest.raises(IntegrityError, match="no SHA-256 metadata"):
        store.get_bytes("a1/unsigned")


def test_minio_prefix_isolation(s3_server: S3Server, s3_bucket: str) -> None:
    store = minio_store(s3_server, s3_bucket, prefix="team-a")
    store.ensure_bucket()
    store.put_bytes("x.bin", b"1")
    raw = s3_server.client()
    raw.put_object(s3_bucket, "team-b/x.bin", io.BytesIO(b"2"), 1)
    assert store.list() == ["x.bin"]
    assert [o.object_name for o in raw.list_objects(s3_bucket, recursive=True)] == [
        "team-a/x.bin",
        "team-b/x.bin",
    ]
    assert store.stat("x.bin").uri == f"s3://{s3_bucket}/team-a/x.bin"


def test_minio_session_token_is_reread(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    token_file = tmp_path / "session-token"
    token_file.write_text("session-one")
    store = MinioStore.from_settings(
        StorageSettings(**s3_server.settings(bucket=s3_bucket, token_file=token_file))
    )
    provider = store.client._provider  # the credentials minio asks for on every request
    assert provider is not None and provider.retrieve().session_token == "session-one"
    store.ensure_bucket()
    store.put_bytes("x", b"signed with a session token")
    (tmp_path / "next").write_text("session-two-rotated")
    (tmp_path / "next").replace(token_file)
    assert provider.retrieve().session_token == "session-two-rotated"
    assert store.get_bytes("x") == b"signed with a session token"


def test_minio_service_errors(s3_server: S3Server, s3_bucket: str) -> None:
    missing = minio_store(s3_server, s3_bucket)
    with pytest.raises(StorageError, match=rf"bucket '{s3_bucket}' does not exist"):
        missing.probe()
    dead = MinioStore.from_settings(
        StorageSettings(
            endpoint=f"127.0.0.1:{free_port()}",
            secure=False,
            access_key="k",
            secret_key="super-secret-key",
            timeout=1.0,
        )
    )
    with pytest.raises(StorageError) as caught:
        dead.probe()
    assert "cannot reach" in str(caught.value) and "super-secret-key" not in str(caught.value)
    with pytest.raises(StorageError, match="invalid bucket name"):
        MinioStore(missing.client, "x").probe()


def test_open_store_and_endpoints(tmp_path: Path, s3_server: S3Server) -> None:
    assert isinstance(open_store(StorageSettings(**s3_server.settings())), MinioStore)
    assert isinstance(open_store(StorageSettings(results_dir=tmp_path)), FileStore)
    assert open_store(StorageSettings()) is None
    assert parse_endpoint("http://minio:9000") == ("minio:9000", False)
    assert parse_endpoint("https://s3.example.org/") == ("s3.example.org", True)
    assert parse_endpoint("minio:9000", default_secure=False) == ("minio:9000", False)
    with pytest.raises(StorageError):
        parse_endpoint("http://minio:9000/bucket")


# ------------------------------------------------------------------------------ FileStore


def test_file_store_tamper_and_crash_safety(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s")
    store.ensure_bucket()
    store.put_bytes("a1/final/result.bin", b"the real result")
    (tmp_path / "s" / "a1" / "final" / "result.bin").write_bytes(b"a forged result")
    with pytest.raises(IntegrityError, match=r"a1/final/result\.bin: SHA-256 mismatch"):
        store.get_bytes("a1/final/result.bin")
    with pytest.raises(IntegrityError):
        store.get_to_file("a1/final/result.bin", tmp_path / "copy.bin")
    assert not (tmp_path / "copy.bin").exists()
    # A writer that dies half-way leaves the old object intact and no temp files.
    store.put_bytes("a1/ckpt.json", b"old")
    with pytest.raises(StorageError, match="cannot read the source stream: stream broke"):
        store.put_stream("a1/ckpt.json", OneWayStream(b"x" * MB, fail_at=256 * 1024))  # type: ignore[arg-type]
    assert store.get_bytes("a1/ckpt.json") == b"old"
    leftovers = [p.name for p in (tmp_path / "s" / "a1").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    (tmp_path / "s" / "stray.bin").write_bytes(b"no index")
    with pytest.raises(IntegrityError, match="no recorded SHA-256"):
        store.get_bytes("stray.bin")
    index = json.loads((tmp_path / "s" / ".flame-index" / "a1" / "ckpt.json.json").read_text())
    assert index["sha256"] == hashlib.sha256(b"old").hexdigest()


def test_file_store_probe(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        FileStore(tmp_path / "missing").probe()
    assert FileStore(tmp_path / "missing").list() == []
    assert isinstance(FileStore(tmp_path), ObjectStore)


@settings(max_examples=40, deadline=None)
@given(
    key=st.lists(
        st.text(alphabet="abcXYZ019_-.=", min_size=1, max_size=8).filter(
            lambda s: s[0] not in ".-="
        ),
        min_size=1,
        max_size=4,
    ).map("/".join),
    data=st.binary(max_size=4096),
)
def test_file_store_round_trip_property(
    tmp_path_factory: pytest.TempPathFactory, key: str, data: bytes
) -> None:
    store = FileStore(tmp_path_factory.mktemp("prop"))
    assert validate_key(key) == key
    stored = store.put_bytes(key, data)
    assert store.get_bytes(key) == data and store.stat(key).sha256 == stored.sha256
    assert store.list() == [key]
    assert os.path.commonpath([store.root, store.root / key]) == str(store.root)

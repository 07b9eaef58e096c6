"""Red team: hostile payloads inside well-formed flame frames (issue 13's Arrow tables).

The attacker is a participant (a malicious node operator, or analysis code in the child
talking to its runtime over the channel): it runs its own encoder, so every frame below is
built by a modified sender and decoded by the real receiver (`flame.wire.envelope.decode`, which
the aggregator, the nodes and the isolation channel all use).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from flame.errors import MessageError
from flame.wire import tables as wire_tables
from flame.wire.envelope import Envelope, decode, encode


def _frame_with_table(
    monkeypatch: pytest.MonkeyPatch, table: pa.Table, compression: str | None = None
) -> bytes:
    """A result frame whose Arrow blob was written by the attacker's own writer."""

    def hostile_encode(obj: object, path: str) -> tuple[dict[str, object], pa.Buffer] | None:
        if not isinstance(obj, pa.Table):
            return None
        sink = pa.BufferOutputStream()
        options = pa.ipc.IpcWriteOptions(compression=compression)
        with pa.ipc.new_stream(sink, obj.schema, options=options) as writer:
            writer.write_table(obj)
        return {"type": "arrow.Table"}, sink.getvalue()

    with monkeypatch.context() as patch:
        patch.setattr(wire_tables, "encode_table", hostile_encode)
        return encode(Envelope("study", "node-0", "aggregator", "result", 0, {"t": table}))


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_a_compressed_arrow_bomb_is_refused_before_it_is_inflated(
    monkeypatch: pytest.MonkeyPatch, codec: str
) -> None:
    """64 MiB of zeros compress to about 2 KB (zstd) or 270 KB (lz4); 1 MiB of such a frame
    would make the receiver allocate up to tens of GiB. It must be refused undecoded."""
    bomb = pa.table({"x": pa.array(np.zeros(64 * 1024 * 1024, dtype=np.int8))})
    frame = _frame_with_table(monkeypatch, bomb, codec)
    del bomb
    assert len(frame) < 1024 * 1024, len(frame)  # under the chunk size: one MQTT message
    with pytest.raises(MessageError, match="compressed"):
        decode(frame)


def test_a_compressed_dictionary_batch_is_refused_too(monkeypatch: pytest.MonkeyPatch) -> None:
    table = pa.table({"s": pa.array(["a", "b"] * 1000).dictionary_encode()})
    with pytest.raises(MessageError, match="compressed"):
        decode(_frame_with_table(monkeypatch, table, "zstd"))


def test_uncompressed_tables_still_cross(monkeypatch: pytest.MonkeyPatch) -> None:
    table = pa.table({"x": [1, 2, 3], "s": pa.array(["a", "b", "a"]).dictionary_encode()})
    assert decode(_frame_with_table(monkeypatch, table)).body["t"].equals(table)


def test_arrows_pickle_extension_type_is_never_unpickled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """CVE-2023-47248: a field tagged arrow.py_extension_type carries a pickle that old
    pyarrow unpickled on read. The payload here would create a folder."""
    target = tmp_path / "pwned"
    payload = f"cposix\nmkdir\n(S'{target}'\ntR.".encode()
    field = pa.field(
        "x",
        pa.int64(),
        metadata={
            b"ARROW:extension:name": b"arrow.py_extension_type",
            b"ARROW:extension:metadata": payload,
        },
    )
    table = pa.Table.from_arrays([pa.array([1, 2])], schema=pa.schema([field]))
    frame = _frame_with_table(monkeypatch, table)
    with contextlib.suppress(MessageError):
        decode(frame)
    assert not target.exists()

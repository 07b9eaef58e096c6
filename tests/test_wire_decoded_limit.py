"""A received table must fit the frame's size limit once decoded, not just on the wire.

Arrow lets a few hundred bytes describe billions of elements (a null column has no buffers;
a dictionary's indices can all point at one big value); pandas, polars and `to_pylist`
would materialize all of them. Each frame here is built by a hostile sender's own writer and
decoded by the real receiver with a small limit, so a missing check shows up as a decode
that succeeds (and allocates ~100x the limit), not as a crashed test machine.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from flame.errors import MessageError
from flame.wire import tables as wire_tables
from flame.wire.envelope import Envelope, decode, encode

LIMIT = 1 << 20


def _frame(monkeypatch: pytest.MonkeyPatch, table: pa.Table) -> bytes:
    def hostile_encode(obj: object, path: str) -> tuple[dict[str, object], pa.Buffer] | None:
        if not isinstance(obj, pa.Table):
            return None
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, obj.schema) as writer:
            writer.write_table(obj)
        return {"type": "pandas.DataFrame"}, sink.getvalue()

    with monkeypatch.context() as patch:
        patch.setattr(wire_tables, "encode_table", hostile_encode)
        body = {"stats": {"counts": table}}
        return encode(Envelope("study", "node-0", "aggregator", "result", 0, body))


def test_a_null_column_that_would_inflate_past_the_limit_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frame = _frame(monkeypatch, pa.table({"x": pa.nulls(10_000_000)}))
    assert len(frame) < 4096  # no buffers: the length alone is the bomb
    with pytest.raises(MessageError, match=r"body\.stats\.counts: .*message limit of 1048576"):
        decode(frame, max_bytes=LIMIT)


def test_nested_elements_count_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """One row holding a list of 10 M nulls: the top level is tiny, the child is not."""
    child = pa.nulls(10_000_000)
    lists = pa.ListArray.from_arrays(pa.array([0, len(child)], pa.int32()), child)
    frame = _frame(monkeypatch, pa.table({"nested": lists}))
    with pytest.raises(MessageError, match="column 'nested'"):
        decode(frame, max_bytes=LIMIT)


def test_a_dictionary_pointing_every_row_at_one_big_value_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = "v" * 100_000
    column = pa.DictionaryArray.from_arrays(pa.array([0] * 10_000, pa.int8()), pa.array([big]))
    frame = _frame(monkeypatch, pa.table({"s": column}))
    assert len(frame) < LIMIT // 4
    with pytest.raises(MessageError, match="message limit"):
        decode(frame, max_bytes=LIMIT)


def test_view_types_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = _frame(monkeypatch, pa.table({"v": pa.array(["a", "b"], pa.string_view())}))
    with pytest.raises(MessageError, match="string_view is not accepted"):
        decode(frame)


def test_ordinary_tables_near_the_limit_still_cross(monkeypatch: pytest.MonkeyPatch) -> None:
    """Numbers decode to the bytes they arrived in; a 0.7 MB table passes a 1 MB limit."""
    table = pa.table(
        {
            "n": pa.array(range(40_000), pa.int64()),
            "s": pa.array([f"k{i % 7}" for i in range(40_000)]).dictionary_encode(),
            "f": pa.array([i / 3 for i in range(20_000)] * 2),
        }
    )
    decoded = decode(_frame(monkeypatch, table), max_bytes=LIMIT).body["stats"]["counts"]
    assert decoded["n"].tolist() == list(range(40_000))
    assert decoded["s"].tolist()[:8] == ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k0"]


def test_the_isolation_channel_caps_tables_from_a_hostile_child() -> None:
    """The channel allows huge frames (arrays travel in a memfd), but a 224-byte table that
    claims 600 M null rows (4.8 GB as objects) from the analysis child is refused."""
    import socket

    from flame.isolation.channel import Channel

    nulls = pa.Array.from_buffers(pa.null(), 600_000_000, [None])  # no buffers at all
    ours, theirs = socket.socketpair()
    parent, child = Channel(ours), Channel(theirs, accept_descriptors=True)
    try:
        child.send("result", {"value": pa.table({"x": nulls})})
        with pytest.raises(MessageError, match=r"body\.value: .*message limit"):
            parent.receive(timeout=5)
        child.send("result", {"value": pa.table({"x": [1, 2]})})  # the channel still works
        assert parent.receive(timeout=5)[1]["value"].num_rows == 2
    finally:
        parent.close()
        child.close()

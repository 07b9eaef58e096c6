"""An isolated analysis reads the node folder through read-only descriptors, not copies.

The child's Landlock domain hides the node's paths (data folder, keys, tokens); the runtime
opens each requested file read-only and passes the descriptor, so `read_csv` streams and
`data.sql` works out of core in the child as in-process, while keys stay unreachable.
"""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from flame.analysis.loader import load_analysis
from flame.data import Data, LocalSource
from flame.data.sources.descriptor import count_records
from flame.errors import MessageError
from flame.isolation.channel import Channel
from flame.isolation.runner import ChildRunner, RowMeter
from flame.node.context import Context
from flame.node.mailbox import Mailbox
from flame.transport.memory import MemoryBroker, MemoryTransport

ANALYSIS = """
import os
import numpy as np

def analyze(data):
    columns = data.read_csv("values.csv")
    table = data.table("values.csv")
    total = data.sql('select sum(v) as s, count(*) as n from "values"').column("s")[0].as_py()
    try:
        open(PROBE_PATH, "rb").read()
        direct = "read"
    except OSError as exc:
        direct = type(exc).__name__
    try:
        data.read_bytes("leak.key")
        leak = "read"
    except Exception as exc:
        leak = str(exc)
    return {"n": int(columns["v"].size), "sum": float(np.nansum(columns["v"])),
            "rows": table.num_rows, "sql_sum": float(total), "direct": direct, "leak": leak,
            "missing": dict(data.missing)}

def aggregate(results):
    return results
"""


def _context() -> Context:
    return Context(
        analysis_id="iso",
        node_id="node-0",
        role="analysis",
        participants=["node-0"],
        aggregator_id="aggregator",
        mailbox=Mailbox(MemoryTransport(MemoryBroker(), "iso", "node-0")),
        seed=1,
    )


def _node(tmp_path: Path, rows: int = 5000) -> tuple[Path, Path]:
    folder = tmp_path / "node-data"
    folder.mkdir()
    lines = ["v"] + [str(i) if i % 100 else "NA" for i in range(rows)]
    (folder / "values.csv").write_text("\n".join(lines) + "\n")
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "node.key").write_text("-----BEGIN SECRET-----\n")
    (folder / "leak.key").symlink_to(keys / "node.key")  # an operator's symlink to a key
    return folder, keys


def test_isolated_reads_use_descriptors_and_keep_keys_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, keys = _node(tmp_path)
    analysis_file = tmp_path / "code" / "analysis.py"
    analysis_file.parent.mkdir()
    analysis_file.write_text(f"PROBE_PATH = {str(folder / 'values.csv')!r}\n" + ANALYSIS)
    analyze = load_analysis(analysis_file).functions.analyze
    served: list[str] = []
    original = ChildRunner._dispatch

    def spy(self: ChildRunner, op: str, args: dict[str, Any]) -> Any:
        served.append(op)
        return original(self, op, args)

    monkeypatch.setattr(ChildRunner, "_dispatch", spy)
    data = Data({"local": LocalSource(folder)}, node_id="node-0")
    runner = ChildRunner(analyze, data, _context(), hide=[folder, keys])
    try:
        outcome = runner.run(0, None)
    finally:
        runner.close()
    result = outcome.result
    expected = [i for i in range(5000) if i % 100]
    assert result["n"] == 5000 and result["sum"] == pytest.approx(sum(expected))
    assert result["rows"] == 5000 and result["sql_sum"] == pytest.approx(sum(expected))
    assert result["missing"] == {"v": 50}
    assert "read" not in served  # no file content crossed the channel
    assert outcome.rows_read == 5000  # still counted by the runtime, for min_rows
    if "hidden" in runner.confinement:  # Landlock: the folder itself is not openable by path
        assert result["direct"] == "PermissionError"
    assert result["leak"] != "read" and "hidden from analyses" in result["leak"]


def test_only_the_childs_channel_accepts_descriptors(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    parent, child = Channel(ours), Channel(theirs, accept_descriptors=True)
    secret = tmp_path / "x"
    secret.write_text("data")
    fd = os.open(secret, os.O_RDONLY)
    try:
        parent.send("reply", {"value": True}, descriptors=[fd])
        assert child.receive(timeout=5) == ("reply", {"value": True})
        (got,) = child.passed
        assert os.pread(got, 4, 0) == b"data"
        os.close(got)
        child.send("reply", {"value": True}, descriptors=[fd])  # a hostile child
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(MessageError, match="malformed channel frame"):
            parent.receive(timeout=5)
        assert len(os.listdir("/proc/self/fd")) == before  # the passed copy was closed
    finally:
        os.close(fd)
        parent.close()
        child.close()


@pytest.mark.parametrize(
    "name, content",
    [
        ("plain.csv", b"a,b\n1,2\n3,4\n"),
        ("no_newline.csv", b"a,b\n1,2\n3,4"),
        ("quoted.csv", b'a,b\n"x\ny",2\n3,4\n'),
        ("doubled.csv", b'"a",b\n"say ""hi""\nthere",2\n3,"4\n\n5"\n'),
        ("mid_quote.csv", b'a,b\nx"y,2\n3,4\n'),
        ("open_quote.csv", b'a,b\n"x,2\n3,4\n'),
        ("blank.csv", b"a,b\n1,2\n\n3,4\n"),
        ("crlf.csv", b"a,b\r\n1,2\r\n3,4\r\n"),
        ("empty.csv", b""),
        ("tabs.tsv", b"a\tb\n1\t2\n"),
        ("lines.jsonl", b'{"a": 1}\n\n{"a": 2}\n'),
        ("notes.txt", b"not\nrows\n"),
    ],
)
def test_descriptor_row_counts_match_the_row_meter(
    tmp_path: Path, name: str, content: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    meter = RowMeter()
    meter.file("s", name, content)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert count_records(name, fd) == meter.rows
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
    finally:
        os.close(fd)


def test_parquet_rows_are_counted_from_the_descriptor(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table({"a": list(range(7))}), sink)
    (tmp_path / "t.parquet").write_bytes(sink.getvalue())
    fd = os.open(tmp_path / "t.parquet", os.O_RDONLY)
    try:
        assert count_records("t.parquet", fd) == 7
    finally:
        os.close(fd)


def test_row_counts_across_piece_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row count reads in pieces (pread, not a memory map: mapped pages counted toward
    RSS); with tiny pieces every quote, newline and edge falls across a cut somewhere."""
    import random

    from flame.data.sources import descriptor

    rng = random.Random(7)
    for trial in range(40):
        rows = [
            ",".join(
                rng.choice(['"a,b"', '"x""y"', "plain", "", '"multi\nline"', "7"]) for _ in range(3)
            )
            for _ in range(rng.randint(1, 12))
        ]
        content = ("h1,h2,h3\n" + "\n".join(rows) + ("\n" if trial % 2 else "")).encode()
        path = tmp_path / f"t{trial}.csv"
        path.write_bytes(content)
        meter = RowMeter()
        meter.file("s", path.name, content)
        fd = os.open(path, os.O_RDONLY)
        try:
            for piece in (1, 2, 3, 5, 8, 1 << 20):
                monkeypatch.setattr(descriptor, "_PIECE", piece)
                assert count_records(path.name, fd) == meter.rows, (trial, piece)
        finally:
            os.close(fd)


def test_the_opener_reads_without_a_memory_map(tmp_path: Path) -> None:
    from flame.data.sources.descriptor import DescriptorSource

    (tmp_path / "t.csv").write_bytes(b"a,b\n1,2\n3,4\n")
    source = DescriptorSource(
        "s", lambda: ["t.csv"], lambda name: os.open(tmp_path / name, os.O_RDONLY)
    )
    opener = source.opener("t.csv")
    first, second = opener(), opener()  # independent offsets over one descriptor
    assert first.read(4) == b"a,b\n"
    assert second.read() == b"a,b\n1,2\n3,4\n"
    assert first.read() == b"1,2\n3,4\n"
    assert not isinstance(first, __import__("pyarrow").BufferReader)
    opener.close()

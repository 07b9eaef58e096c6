"""The `data` handle: sources, listing, reading, CSV parsing and its errors."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest

from flame.data import Data, FileSource, LocalSource, MemorySource
from flame.errors import DataError


def write(root: Path, name: str, content: str | bytes) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write(tmp_path, "b.csv", "x,y\n1,2\n")
    write(tmp_path, "a.csv", "x,y\n3,4\n")
    write(tmp_path, "sub/deep/c.csv", "x,y\n5,6\n")
    write(tmp_path, "notes.txt", "hello")
    write(tmp_path, ".hidden", "secret")
    write(tmp_path, ".git/config", "nope")
    (tmp_path / "empty_dir").mkdir()
    return tmp_path


# --- sources ---------------------------------------------------------------------------------


def test_local_source_lists_files_sorted_relative_posix(folder: Path) -> None:
    source = LocalSource(folder)
    assert isinstance(source, FileSource)
    assert source.files() == ["a.csv", "b.csv", "notes.txt", "sub/deep/c.csv"]
    with source.open("sub/deep/c.csv") as stream:
        assert stream.read() == (folder / "sub/deep/c.csv").read_bytes()


def test_local_source_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        LocalSource(tmp_path / "missing")
    write(tmp_path, "file.txt", "x")
    with pytest.raises(DataError):
        LocalSource(tmp_path / "file.txt")


def test_local_source_missing_file(folder: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv"):
        LocalSource(folder).open("nope.csv")


@pytest.mark.parametrize(
    "name", ["../outside.txt", "sub/../../outside.txt", "/etc/passwd", "", ".", "a/../../x"]
)
def test_path_traversal_is_refused(tmp_path: Path, name: str) -> None:
    root = tmp_path / "node"
    root.mkdir()
    write(tmp_path, "outside.txt", "not yours")
    data = Data.from_path(root, node_id="n")
    with pytest.raises(DataError):
        data.read_bytes(name)
    with pytest.raises(DataError):
        MemorySource({"ok.txt": "x"}).open(name)


def test_memory_source_refuses_unsafe_names_up_front() -> None:
    with pytest.raises(DataError):
        MemorySource({"../x": "boom"})


def test_memory_source() -> None:
    source = MemorySource({"z.csv": "a\n1\n", "dir/a.bin": b"\x00\x01", "m.txt": "ü"})
    assert isinstance(source, FileSource)
    assert source.files() == ["dir/a.bin", "m.txt", "z.csv"]
    assert source.open("dir/a.bin").read() == b"\x00\x01"
    assert source.open("m.txt").read() == "ü".encode()
    with pytest.raises(DataError, match="missing"):
        source.open("missing")


def test_data_files_with_patterns(folder: Path) -> None:
    data = Data.from_path(folder, node_id="n1")
    assert data.files() == ["a.csv", "b.csv", "notes.txt", "sub/deep/c.csv"]
    assert data.files("*.csv") == ["a.csv", "b.csv", "sub/deep/c.csv"]
    assert data.files("sub/*") == ["sub/deep/c.csv"]
    assert data.files("*.parquet") == []


def test_data_read_bytes_and_text(folder: Path) -> None:
    data = Data.from_path(folder)
    assert data.read_bytes("notes.txt") == b"hello"
    assert data.read_text("notes.txt") == "hello"
    write(folder, "latin.txt", "café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt"):
        data.read_text("latin.txt")
    assert data.read_text("latin.txt", encoding="latin-1") == "café"


def test_data_sources_by_name(folder: Path) -> None:
    memory = MemorySource({"m.csv": "x\n9\n"})
    other = object()
    data = Data({"api": other, "disk": LocalSource(folder), "mem": memory}, node_id="n")
    assert data.source() is other  # the first configured source
    assert data.source("mem") is memory
    assert data.files() == LocalSource(folder).files()  # the first *file* source
    assert data.files(source="mem") == ["m.csv"]
    with pytest.raises(DataError, match="no data source named 'nope'"):
        data.source("nope")
    with pytest.raises(DataError, match="does not serve files"):
        data.files(source="api")
    assert data.sources == {"api": other, "disk": data.source("disk"), "mem": memory}


def test_data_without_sources() -> None:
    data = Data(node_id="lonely")
    with pytest.raises(DataError, match="lonely"):
        data.source()
    with pytest.raises(DataError, match="lonely"):
        data.files()
    with pytest.raises(DataError, match="lonely"):
        data.read_csv()


# --- CSV -------------------------------------------------------------------------------------


def pooled(*texts: str) -> dict[str, list[str]]:
    """Independent reference: the columns of several CSV texts, cells as text."""
    columns: dict[str, list[str]] = {}
    for text in texts:
        reader = csv.reader(io.StringIO(text))
        header = next(reader)
        for row in reader:
            if not row:
                continue
            for name, cell in zip(header, row, strict=True):
                columns.setdefault(name, []).append(cell)
    return columns


def test_read_csv_stacks_all_files(tmp_path: Path) -> None:
    texts = {
        "part_2.csv": "id,value,label\n3,0.5,c\n4,-1e3,d\n",
        "part_1.csv": "id,value,label\n1,2.25,a\n2,,b\n",
        "sub/part_3.csv": "id,value,label\n5,7,e\n",
    }
    for name, text in texts.items():
        write(tmp_path, name, text)
    write(tmp_path, "readme.txt", "not a csv")
    table = Data.from_path(tmp_path).read_csv()
    order = sorted(texts)  # files are read in sorted name order
    expected = pooled(*(texts[name] for name in order))
    assert list(table) == ["id", "value", "label"]
    assert table["id"].dtype == np.float64
    assert table["id"].tolist() == [float(v) for v in expected["id"]]
    values = [float(v) if v else math.nan for v in expected["value"]]
    assert np.array_equal(table["value"], np.array(values), equal_nan=True)
    assert table["label"].dtype.kind == "U"
    assert table["label"].tolist() == expected["label"]


def test_read_csv_one_file(folder: Path) -> None:
    table = Data.from_path(folder).read_csv("sub/deep/c.csv")
    assert table["x"].tolist() == [5.0] and table["y"].tolist() == [6.0]


def test_numeric_and_text_columns() -> None:
    text = "num,mixed,blank,sci,spaces,label\n1,1,,1e-3, 2 ,a\n2,two,,-4.5E2,3,b\n3,3,,inf,,1\n"
    table = Data({"m": MemorySource({"t.csv": text})}).read_csv()
    assert table["num"].dtype == np.float64 and table["num"].tolist() == [1.0, 2.0, 3.0]
    # mostly numbers: stays numeric, the stray text cell is NaN (with a warning, tested below)
    assert table["mixed"].dtype == np.float64 and table["mixed"][[0, 2]].tolist() == [1.0, 3.0]
    assert table["label"].dtype.kind == "U" and table["label"].tolist() == ["a", "b", "1"]
    assert table["blank"].dtype == np.float64 and np.isnan(table["blank"]).all()
    assert table["sci"].tolist() == [1e-3, -450.0, math.inf]
    assert table["spaces"][:2].tolist() == [2.0, 3.0] and math.isnan(table["spaces"][2])


def test_empty_cells_are_nan_in_numeric_columns() -> None:
    text = "a,b\n1,\n,2\n3,4\n"
    table = Data({"m": MemorySource({"t.csv": text})}).read_csv()
    assert np.array_equal(table["a"], [1.0, math.nan, 3.0], equal_nan=True)
    assert np.array_equal(table["b"], [math.nan, 2.0, 4.0], equal_nan=True)


def test_quoted_cells() -> None:
    text = 'name,note\n"Smith, J","said ""hi"""\n"Doe","multi\nline"\n'
    table = Data({"m": MemorySource({"t.csv": text})}).read_csv()
    assert table["name"].tolist() == ["Smith, J", "Doe"]
    assert table["note"].tolist() == ['said "hi"', "multi\nline"]


def test_header_only_file_and_empty_file_stack(tmp_path: Path) -> None:
    write(tmp_path, "a.csv", "x,y\n1,2\n")
    write(tmp_path, "b.csv", "x,y\n")
    table = Data.from_path(tmp_path).read_csv()
    assert table["x"].tolist() == [1.0]


def test_mismatched_headers_name_both_files(tmp_path: Path) -> None:
    write(tmp_path, "a.csv", "x,y\n1,2\n")
    write(tmp_path, "b.csv", "x,z\n3,4\n")
    with pytest.raises(DataError) as caught:
        Data.from_path(tmp_path).read_csv()
    message = str(caught.value)
    assert "a.csv" in message and "b.csv" in message


def test_same_columns_in_other_order_is_a_mismatch(tmp_path: Path) -> None:
    write(tmp_path, "a.csv", "x,y\n1,2\n")
    write(tmp_path, "b.csv", "y,x\n3,4\n")
    with pytest.raises(DataError, match=r"b\.csv"):
        Data.from_path(tmp_path).read_csv()


def test_no_csv_files(tmp_path: Path) -> None:
    write(tmp_path, "a.txt", "x")
    with pytest.raises(DataError, match="no CSV"):
        Data.from_path(tmp_path, node_id="n9").read_csv()


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a,b\n1,2\n3\n", 3),  # too few cells
        ("a,b\n1,2,3\n", 2),  # too many cells
        ("a,b\n1,2\n3,4\n5,6,7\n", 4),
    ],
)
def test_rows_with_ragged_lines(text: str, line: int) -> None:
    data = Data({"m": MemorySource({"r.csv": text})})
    with pytest.raises(DataError) as caught:
        list(data.rows("r.csv"))
    assert "r.csv" in str(caught.value) and f"line {line}" in str(caught.value)
    with pytest.raises(DataError):
        data.read_csv()


def test_rows_are_dicts_of_text() -> None:
    data = Data({"m": MemorySource({"r.csv": "a,b\n1,x\n\n2,y\n"})})
    assert list(data.rows("r.csv")) == [{"a": "1", "b": "x"}, {"a": "2", "b": "y"}]


def test_crlf_line_endings() -> None:
    data = Data({"m": MemorySource({"r.csv": b"a,b\r\n1,2\r\n3,4\r\n"})})
    table = data.read_csv()
    assert table["b"].tolist() == [2.0, 4.0]


def test_read_csv_from_named_source(folder: Path) -> None:
    data = Data({"disk": LocalSource(folder), "mem": MemorySource({"q.csv": "k\n7\n8\n"})})
    assert data.read_csv(source="mem")["k"].tolist() == [7.0, 8.0]


def test_utf8_bom_is_not_part_of_the_first_column() -> None:
    data = Data({"m": MemorySource({"r.csv": "age,bmi\n50,20\n".encode("utf-8-sig")})})
    assert list(data.read_csv()) == ["age", "bmi"]


def test_repeated_column_names_are_refused() -> None:
    data = Data({"m": MemorySource({"r.csv": "a,a,b\n1,2,3\n"})})
    with pytest.raises(DataError, match="'a'"):
        data.read_csv()

"""CSV text encodings (flame.data.encodings): BOMs and UTF-16 are read, a source's
`encoding` setting is honoured, and a bad byte or row is named by file, line and column,
never by the row's values."""

from __future__ import annotations

from pathlib import Path

import pytest

from flame.config import DataSourceSettings
from flame.data import Data, LocalSource
from flame.data.sources import open_sources
from flame.errors import DataError

SECRET = "Zebulon"  # a value that must never appear in an error


def _data(tmp_path: Path, files: dict[str, bytes], encoding: str | None = None) -> Data:
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return Data({"local": LocalSource(folder, encoding=encoding)})


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-8-sig", "utf-32"])
def test_byte_order_marks_and_bomless_utf16_are_read(tmp_path: Path, codec: str) -> None:
    text = "age,weight,name\n41,70.5,Zoë\n52,81,Ana\n"
    table = _data(tmp_path, {"r.csv": text.encode(codec)}).read_csv("r.csv")
    assert table["age"].tolist() == [41.0, 52.0]
    assert table["name"].tolist() == ["Zoë", "Ana"]


def test_mixed_encoding_names_file_line_and_column_not_values(tmp_path: Path) -> None:
    content = f"id,name,score\n1,{SECRET},2\n".encode() + b"2,Jos\xe9,3\n"
    data = _data(tmp_path, {"mixed.csv": content})
    with pytest.raises(DataError) as caught:
        data.read_csv("mixed.csv")
    text = str(caught.value)
    assert "'mixed.csv' cannot be read as csv: line 3, column 'name'" in text
    assert "encoding" in text  # the setting that fixes it
    assert SECRET not in text and "Jos" not in text


def test_the_source_encoding_setting_is_used(tmp_path: Path) -> None:
    folder = tmp_path / "latin"
    folder.mkdir()
    (folder / "r.csv").write_bytes(b"id,name\n1,Jos\xe9\n")
    settings = DataSourceSettings(name="clinic", kind="local", path=folder, encoding="cp1252")
    data = Data(open_sources([settings]))
    assert data.read_csv("r.csv")["name"].tolist() == ["José"]
    with pytest.raises(DataError, match="unknown text encoding 'klingon'"):
        LocalSource(folder, encoding="klingon")


def test_a_row_of_the_wrong_width_is_named_by_line_without_its_cells(tmp_path: Path) -> None:
    data = _data(tmp_path, {"r.csv": f"a,b,c\n1,2,3\n{SECRET},5\n".encode()})
    with pytest.raises(DataError) as caught:
        data.read_csv("r.csv")
    assert "'r.csv' cannot be read as csv: line 3: expected 3 columns, got 2" in str(caught.value)
    assert SECRET not in str(caught.value)

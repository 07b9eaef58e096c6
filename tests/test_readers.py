"""Readers on Arrow: missing markers, stray text, table formats, DataFrames, DuckDB SQL."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import flame
from flame.analysis.loader import load_analysis
from flame.data import Data, MemorySource
from flame.errors import DataError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_missing_markers_are_nan_and_counted() -> None:
    text = "age,weight\n34,70\nNA,71\n,NULL\n.,N/A\n40,null\nNaN,72\n"
    data = Data({"m": MemorySource({"t.csv": text})})
    table = data.read_csv()
    assert table["age"].dtype == np.float64 and table["weight"].dtype == np.float64
    assert np.array_equal(table["age"], [34, np.nan, np.nan, np.nan, 40, np.nan], equal_nan=True)
    assert np.array_equal(table["weight"], [70, 71, np.nan, np.nan, np.nan, 72], equal_nan=True)
    assert data.missing == {"age": 4, "weight": 3}
    assert data.invalid == {}


def test_stray_text_warns_with_column_file_row_and_count_never_the_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    files = {"a.csv": "age,name\n30,x\n31,y\n", "b.csv": "age,name\n32,z\nunknown,w\n<5,v\n33,u\n"}
    data = Data({"m": MemorySource(files)})
    with caplog.at_level(logging.WARNING, logger="flame.data.readers"):
        table = data.read_csv()
    assert table["age"].dtype == np.float64
    assert np.array_equal(table["age"], [30, 31, 32, np.nan, np.nan, 33], equal_nan=True)
    assert table["name"].tolist() == ["x", "y", "z", "w", "v", "u"]  # text stays text
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "'age'" in warning and "b.csv" in warning and "row 2" in warning
    assert "unknown" not in warning and "<5" not in warning  # cell values never in logs
    assert "2 text cell(s)" in warning
    assert data.invalid == {"age": 2}


def test_ragged_rows_and_repeated_columns_are_clear_errors() -> None:
    with pytest.raises(DataError, match=r"'t.csv' cannot be read as csv"):
        Data({"m": MemorySource({"t.csv": "a,b\n1,2\n3\n"})}).read_csv()
    with pytest.raises(DataError, match="repeats the column name"):
        Data({"m": MemorySource({"t.csv": "a,a\n1,2\n"})}).read_csv()


def test_table_keeps_types_and_reads_parquet_and_json_lines(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("id,age,site\n1,30,x\n2,NA,y\n")
    pq.write_table(pa.table({"id": [3, 4], "dose": [1.5, None]}), tmp_path / "d.parquet")
    (tmp_path / "e.jsonl").write_text(json.dumps({"k": 1, "v": "a"}) + "\n" + '{"k": 2}\n')
    data = Data.from_path(tmp_path)
    csv_table = data.table()
    assert csv_table.schema.field("id").type == pa.int64()
    assert csv_table.column("age").to_pylist() == [30, None]
    assert data.table("d.parquet").column("dose").to_pylist() == [1.5, None]
    assert data.table("*.jsonl").to_pylist() == [{"k": 1, "v": "a"}, {"k": 2, "v": None}]
    frame = data.to_pandas("r.csv")
    assert isinstance(frame, pd.DataFrame) and frame["site"].tolist() == ["x", "y"]
    assert isinstance(data.to_polars("d.parquet"), pl.DataFrame)
    with pytest.raises(DataError, match="not a table file"):
        (tmp_path / "notes.txt").write_text("hi")
        data.table("notes.txt")


def test_duckdb_sql_over_node_files(tmp_path: Path) -> None:
    (tmp_path / "records.csv").write_text("age,sex\n30,f\nNA,m\n50,f\n")
    pq.write_table(pa.table({"v": [1, 2, 3]}), tmp_path / "visits.parquet")
    data = Data.from_path(tmp_path)
    result = data.sql("select avg(age) as mean, count(age) as n from records")
    assert result.to_pylist() == [{"mean": 40.0, "n": 2}]
    assert data.sql("select sum(v) as s from visits where v > ?", [1]).to_pylist() == [{"s": 5}]
    with pytest.raises(DataError, match=r"SQL failed.*tables: records, visits"):
        data.sql("select * from nope")
    data.close()


def test_duckdb_sql_over_a_non_local_source() -> None:
    data = Data({"m": MemorySource({"x.csv": "a\n1\n2\n"})})
    assert data.sql("select sum(a) as s from x").to_pylist() == [{"s": 3}]
    data.close()


def test_federated_mean_with_na_cells_gives_pooled_mean_of_valid_values(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "federated_mean" / "data", tmp_path / "data")
    files = sorted((tmp_path / "data").rglob("*.csv"))
    pooled: dict[str, list[float]] = {}
    for number, path in enumerate(files):
        lines = path.read_text().splitlines()
        header = lines[0].split(",")
        rows = [line.split(",") for line in lines[1:]]
        rows[1][0] = "NA" if number == 0 else rows[1][0]  # R's missing marker
        rows[2][-1] = "" if number == 1 else rows[2][-1]
        path.write_text("\n".join([",".join(header), *(",".join(r) for r in rows)]) + "\n")
        for row in rows:
            for column, cell in zip(header, row, strict=True):
                if cell not in ("NA", ""):
                    pooled.setdefault(column, []).append(float(cell))
    analysis = load_analysis(EXAMPLES / "federated_mean")
    f = analysis.functions
    result = flame.simulate(f.analyze, f.aggregate, data=tmp_path / "data")
    assert set(result.value) == set(pooled)
    for column, values in pooled.items():
        assert result.value[column]["n"] == len(values)
        assert result.value[column]["mean"] == pytest.approx(np.mean(values), abs=1e-9)


@pytest.mark.parametrize("stray_row", [None, 5, 40_000])
def test_streamed_local_read_equals_the_general_read(
    tmp_path: Path, stray_row: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Local files are streamed block by block (several blocks here); same answer, same warning."""
    rng = np.random.default_rng(3)
    lines = ["id,value,site,flag"]
    for i in range(60_000):
        value = "NA" if i % 97 == 0 else f"{rng.normal(50, 10):.3f}"
        if i == stray_row:
            value = "see notes"
        site = "" if i % 89 == 0 else f"site-{i % 7}"
        lines.append(f"{i},{value},{site},{i % 2}")
    text = "\n".join(lines) + "\n"
    (tmp_path / "big.csv").write_text(text)
    assert len(text) > 4 * 256 * 1024
    local = Data.from_path(tmp_path)
    with caplog.at_level(logging.WARNING, logger="flame.data.readers"):
        streamed = local.read_csv()
    general = Data({"m": MemorySource({"big.csv": text})})
    expected = general.read_csv()
    assert list(streamed) == list(expected) == ["id", "value", "site", "flag"]
    for column, values in expected.items():
        assert streamed[column].dtype == values.dtype
        assert np.array_equal(streamed[column], values, equal_nan=values.dtype.kind == "f")
    assert local.missing == general.missing == {"value": 619 - (stray_row == 0), "site": 675}
    assert local.invalid == general.invalid == ({} if stray_row is None else {"value": 1})
    if stray_row is not None:
        assert "'see notes'" not in caplog.text and "big.csv" in caplog.text
    streamed["value"][0] = 1.0  # writable, like any numpy array the analyst owns

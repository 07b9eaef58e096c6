"""Tables and int-keyed dicts through the real message encoding arrive as what was sent."""

from __future__ import annotations

import datetime

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flame.errors import MessageError
from flame.wire.envelope import Envelope, decode, encode, to_jsonable


def round_trip(body: object) -> object:
    frame = encode(Envelope("a1", "node-a", "aggregator", "result", 0, body))
    return decode(frame).body


def test_int_keyed_dicts_keep_their_keys() -> None:
    counts = pd.Series([3, 1, 3, 2, 3, 1]).value_counts().to_dict()
    assert all(isinstance(k, (int, np.integer)) for k in counts)
    back = round_trip({"counts": counts, "mixed": {1: "a", "b": 2, 2.5: None, None: [1]}})
    assert back == {"counts": {3: 3, 1: 2, 2: 1}, "mixed": {1: "a", "b": 2, 2.5: None, None: [1]}}
    assert all(type(k) is int for k in back["counts"])  # type: ignore[index]


def test_a_keyed_dict_with_an_unsendable_key_names_the_path() -> None:
    with pytest.raises(TypeError, match=r"body\.x: a dict key of type tuple") as refused:
        round_trip({"x": {(1, 2): 1, 3: 4}})
    assert "(1, 2)" not in str(refused.value)  # a key may be a value: only its type is named


def test_pandas_frame_with_index_nullable_categorical_datetime() -> None:
    frame = pd.DataFrame(
        {
            "n": pd.array([1, None, 3], dtype="Int64"),
            "s": pd.array(["x", None, "z"], dtype="string"),
            "c": pd.Categorical(["a", "b", "a"]),
            "t": pd.to_datetime(["2024-01-01", None, "2024-03-01"]),
            "f": [0.5, np.nan, 2.0],
        },
        index=pd.Index(["p", "q", "r"], name="id"),
    )
    back = round_trip({"frame": frame})["frame"]  # type: ignore[index]
    assert isinstance(back, pd.DataFrame)
    pd.testing.assert_frame_equal(back, frame)


def test_pandas_series_arrow_table_record_batch_and_polars() -> None:
    series = pd.Series([1.5, 2.5], index=[10, 20], name="dose")
    table = pa.table({"a": [1, 2], "b": ["x", None]})
    batch = table.to_batches()[0]
    polars_frame = pl.DataFrame({"a": [1, None], "b": ["u", "v"]})
    polars_series = pl.Series("w", [1.0, 2.0])
    back = round_trip([series, table, batch, polars_frame, polars_series, pd.Series([1], name=3)])
    assert isinstance(back, list)
    pd.testing.assert_series_equal(back[0], series)
    assert isinstance(back[1], pa.Table) and back[1].equals(table)
    assert isinstance(back[2], pa.RecordBatch) and back[2].equals(batch)
    assert isinstance(back[3], pl.DataFrame) and back[3].equals(polars_frame)
    assert isinstance(back[4], pl.Series) and back[4].equals(polars_series)
    assert back[4].name == "w"
    assert back[5].name == 3


def test_a_corrupt_arrow_blob_is_a_message_error() -> None:
    frame = bytearray(encode(Envelope("a1", "n", "aggregator", "result", 0, pa.table({"a": [1]}))))
    frame[-40:-30] = b"\xff" * 10
    with pytest.raises(MessageError):
        decode(bytes(frame))


def test_an_arrow_reference_of_unknown_type_is_refused() -> None:
    good = encode(Envelope("a1", "n", "aggregator", "result", 0, pa.table({"a": [1]})))
    bad = good.replace(b'"type":"arrow.Table"', b'"type":"pickle.load"', 1)
    with pytest.raises(MessageError, match="unknown type"):
        decode(bad)


def test_tables_in_json_output() -> None:
    frame = pd.DataFrame({"a": [1, 2], "t": pd.to_datetime(["2024-01-01", "2024-01-02"])})
    assert to_jsonable({"f": frame, "k": {1: 2}}) == {
        "f": {"a": [1, 2], "t": ["2024-01-01T00:00:00", "2024-01-02T00:00:00"]},
        "k": {"1": 2},
    }


_COLUMNS = st.sampled_from(["int64", "Int64", "float", "string", "category", "datetime", "bool"])


def _column(kind: str, values: list[int | None]) -> pd.Series:
    if kind == "int64":
        return pd.Series([v or 0 for v in values], dtype="int64")
    if kind == "Int64":
        return pd.Series(values, dtype="Int64")
    if kind == "float":
        return pd.Series([np.nan if v is None else v / 7 for v in values], dtype="float64")
    if kind == "string":
        return pd.Series([None if v is None else f"s{v}é" for v in values], dtype="string")
    if kind == "category":
        return pd.Series(["a" if (v or 0) % 2 else "b" for v in values], dtype="category")
    if kind == "bool":
        return pd.Series([(v or 0) % 2 == 0 for v in values], dtype="bool")
    base = datetime.datetime(2020, 1, 1)
    return pd.Series(
        [None if v is None else base + datetime.timedelta(hours=v) for v in values],
        dtype="datetime64[ns]",
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(_COLUMNS, min_size=1, max_size=5),
    values=st.lists(st.one_of(st.none(), st.integers(-1000, 1000)), min_size=0, max_size=20),
)
def test_dtypes_round_trip_in_pandas_polars_and_arrow(
    kinds: list[str], values: list[int | None]
) -> None:
    frame = pd.DataFrame({f"c{i}_{kind}": _column(kind, values) for i, kind in enumerate(kinds)})
    back = round_trip({"pandas": frame, "arrow": pa.Table.from_pandas(frame)})
    assert isinstance(back, dict)
    pd.testing.assert_frame_equal(back["pandas"], frame)
    assert back["arrow"].equals(pa.Table.from_pandas(frame))
    polars_frame = pl.from_pandas(frame)
    polars_back = round_trip(polars_frame)
    assert isinstance(polars_back, pl.DataFrame) and polars_back.equals(polars_frame)

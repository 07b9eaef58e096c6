"""Tabular files into Arrow, with missing values and stray text never passing silently.

CSV is parsed by pyarrow (multi-threaded, typed); Parquet and JSON lines by pyarrow too.
The standard missing markers (empty, NA, N/A, NULL, null, NaN, ".") become null. A column
whose present cells are mostly numbers but holds some text (a stray "n/a?" or "<5") stays
numeric: the text cells become null and a warning names the column, the file, the first
offending value and how many there were. Several files are stacked when they share one
header; a column typed differently across files is unified the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from flame.data.encodings import (
    detect_encoding,
    locate_ragged_row,
    locate_undecodable,
    read_head,
)
from flame.errors import DataError

__all__ = ["MISSING_MARKERS", "FORMATS", "ReadReport", "file_format", "read_tables", "to_numpy"]

log = logging.getLogger(__name__)

MISSING_MARKERS = ("", "NA", "N/A", "NULL", "null", "NaN", "nan", ".")
"""Cells that mean "no value" (what R, SAS, Stata, pandas and SQL dumps write)."""

FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "json",
    ".ndjson": "json",
}
_NUMBER = r"^\s*[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf)\s*$"


@dataclass
class ReadReport:
    """What a read found: missing cells and stray text cells per column (both now null)."""

    files: list[str] = field(default_factory=list)
    missing: dict[str, int] = field(default_factory=dict)
    invalid: dict[str, int] = field(default_factory=dict)


def file_format(name: str) -> str:
    """'csv', 'tsv', 'parquet' or 'json' from the file name; DataError otherwise."""
    found = FORMATS.get(PurePosixPath(name).suffix.lower())
    if found is None:
        known = ", ".join(sorted(FORMATS))
        raise DataError(f"{name!r}: not a table file (known endings: {known})")
    return found


def _read_csv(
    name: str, where: Path | IO[bytes], delimiter: str, configured: str | None
) -> pa.Table:
    """A CSV file in its encoding (BOM, the source's setting, or UTF-8); a bad byte or a
    row of the wrong width is a DataError naming file, line and column, not the row."""
    encoding, _ = detect_encoding(read_head(where), configured)
    hint = (
        "; if the file is in another encoding, set the data source's `encoding` "
        '(e.g. encoding = "cp1252")'
    )
    try:
        table = pacsv.read_csv(
            where,
            read_options=pacsv.ReadOptions(encoding="utf8" if encoding == "utf-8" else encoding),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(
                null_values=list(MISSING_MARKERS), strings_can_be_null=True
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        text = str(exc)
        if isinstance(exc, UnicodeDecodeError) or "utf8" in text.lower().replace("-", ""):
            raise _undecodable(name, where, encoding, delimiter, hint) from None
        if "Expected" in text and "columns" in text:
            found = locate_ragged_row(where, encoding, delimiter)
            at = f" line {found[0]}:" if found else ""
            shape = (
                f"expected {found[1]} columns, got {found[2]}"
                if found
                else "a row of the wrong width"
            )
            one = found is not None and found[2] == 1  # what another encoding looks like
            raise DataError(
                f"{name!r} cannot be read as csv:{at} {shape}{hint if one else ''}"
            ) from None
        raise DataError(f"{name!r} cannot be read as csv: {text.split(':')[0][:200]}") from None
    if any(pa.types.is_binary(column.type) for column in table.columns):
        raise _undecodable(name, where, encoding, delimiter, hint)  # pyarrow's fallback
    return table


def _undecodable(
    name: str, where: Path | IO[bytes], encoding: str, delimiter: str, hint: str
) -> DataError:
    found = locate_undecodable(where, encoding, delimiter)
    at = f" line {found[0]}, column {found[1]}:" if found else ""
    return DataError(f"{name!r} cannot be read as csv:{at} not valid {encoding} text{hint}")


def _read_one(name: str, where: Path | IO[bytes], encoding: str | None = None) -> pa.Table:
    kind = file_format(name)
    if kind in ("csv", "tsv"):
        return _read_csv(name, where, "\t" if kind == "tsv" else ",", encoding)
    try:
        if kind == "parquet":
            return pq.read_table(where)
        return pajson.read_json(where)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        from flame.privacy.quoting import quote_parser_message

        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        detail = quote_parser_message(detail)  # it may quote a record: stays on the node
        raise DataError(f"{name!r} cannot be read as {kind}: {detail}") from None


def _check_header(name: str, table: pa.Table) -> None:
    names = table.column_names
    repeated = sorted({column for column in names if names.count(column) > 1})
    if repeated:
        raise DataError(f"{name!r} repeats the column name(s) {', '.join(map(repr, repeated))}")


def _is_number_type(kind: pa.DataType) -> bool:
    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind))


def recover_numbers(
    column: str, data: pa.ChunkedArray, files: Sequence[tuple[str, int]], report: ReadReport
) -> pa.ChunkedArray:
    """A text column that is mostly numbers: numbers as float64, the text cells null + warning."""
    text = pc.utf8_trim_whitespace(data) if pa.types.is_string(data.type) else data
    is_number = pc.match_substring_regex(text, _NUMBER, ignore_case=True)
    numbers = int(pc.sum(is_number).as_py() or 0)
    present = len(data) - data.null_count
    stray = present - numbers
    if stray == 0 or numbers <= stray:
        return data  # all numbers would have parsed already; mostly text stays text
    bad = pc.and_(pc.invert(is_number), pc.is_valid(data))
    first = int(pc.index(bad, True).as_py())
    offset = 0
    file_name = files[-1][0]
    for name, rows in files:
        if first < offset + rows:
            file_name = name
            break
        offset += rows
    log.warning(  # never the cell's value: logs may be forwarded off the node
        "column %r of %s: %d text cell(s) in a numeric column were read as missing "
        "(first at row %d)",
        column,
        file_name,
        stray,
        first - offset + 1,
    )
    report.invalid[column] = report.invalid.get(column, 0) + stray
    kept = pc.if_else(is_number, text, pa.scalar(None, pa.string()))
    return pc.cast(kept, pa.float64())


def _unify(
    column: str, parts: list[pa.ChunkedArray], files: Sequence[tuple[str, int]], report: ReadReport
) -> pa.ChunkedArray:
    types = {part.type for part in parts}
    if len(types) == 1 and not pa.types.is_string(next(iter(types))):
        data = pa.chunked_array([c for part in parts for c in part.chunks], type=parts[0].type)
        return data
    if all(_is_number_type(t) for t in types):
        target = pa.float64() if any(pa.types.is_floating(t) for t in types) else pa.int64()
        return pa.chunked_array(
            [c for part in parts for c in part.cast(target).chunks], type=target
        )
    if not all(_is_number_type(t) or pa.types.is_string(t) for t in types):
        return pa.chunked_array(
            [c for part in parts for c in part.cast(pa.string()).chunks], type=pa.string()
        )
    data = pa.chunked_array(
        [c for part in parts for c in part.cast(pa.string()).chunks], type=pa.string()
    )
    return recover_numbers(column, data, files, report)


def read_tables(
    entries: Sequence[tuple[str, Path | IO[bytes]]], encoding: str | None = None
) -> tuple[pa.Table, ReadReport]:
    """Read and stack files (`(name, path or stream)`), which must share one header;
    `encoding`: the source's setting for text files without a byte-order mark."""
    report = ReadReport(files=[name for name, _ in entries])
    tables: list[tuple[str, pa.Table]] = []
    for name, where in entries:
        table = _read_one(name, where, encoding)
        _check_header(name, table)
        if tables and table.column_names != tables[0][1].column_names:
            raise DataError(
                f"{name!r} has columns {table.column_names}, but {tables[0][0]!r} has "
                f"{tables[0][1].column_names}"
            )
        tables.append((name, table))
    if not tables:
        raise DataError("no table files to read")
    files = [(name, table.num_rows) for name, table in tables]
    columns: dict[str, pa.ChunkedArray] = {}
    for column in tables[0][1].column_names:
        parts = [table.column(column) for _, table in tables]
        before = sum(part.null_count for part in parts)
        data = _unify(column, parts, files, report)
        if before:
            report.missing[column] = before
        columns[column] = data
    for column, count in report.missing.items():
        log.info("column %r: %d missing cell(s) read as null", column, count)
    return pa.Table.from_arrays(list(columns.values()), names=list(columns)), report


def _nan() -> pa.Scalar:
    """A float64 NaN scalar built from a buffer (`pa.scalar` would import pandas)."""
    buffer = pa.py_buffer(np.array([np.nan]))
    return pa.Array.from_buffers(pa.float64(), 1, [None, buffer])[0]


def to_numpy(data: pa.ChunkedArray) -> np.ndarray:
    """float64 (NaN for null) for numbers, str (null as "") for anything else.

    Only zero-copy conversions and `to_pylist` are used: pyarrow's other numpy conversions
    (and `pa.scalar`) import pandas when it is installed, seconds on a cold start.
    """
    kind = data.type
    if _is_number_type(kind):
        if not pa.types.is_float64(kind):
            data = data.cast(pa.float64())
        if data.null_count:
            data = data.fill_null(_nan())
        chunks = [
            np.frombuffer(chunk.buffers()[1], dtype=np.float64)[
                chunk.offset : chunk.offset + len(chunk)
            ]
            for chunk in data.chunks
        ]
        if len(chunks) == 1:
            single: np.ndarray = chunks[0]
            return single if single.flags.writeable else single.copy()
        stacked: np.ndarray = np.concatenate(chunks) if chunks else np.empty(0, np.float64)
        return stacked
    if not pa.types.is_string(kind) and not pa.types.is_large_string(kind):
        data = data.cast(pa.string())
    cells = [
        cell if cell is not None else "" for chunk in data.chunks for cell in chunk.to_pylist()
    ]
    return np.array(cells, dtype=str) if cells else np.empty(0, dtype=str)

"""`data.read_csv()` for files on disk: streamed straight into numpy, about 2x the file in RSS.

Reading a whole CSV into an Arrow table and then copying it into numpy holds the data twice,
plus pyarrow's allocator caches. Here the file is streamed in small blocks: the first block
decides each column's type (numbers -> float64, anything else -> text), numeric columns are
written into float64 arrays allocated once (sized by the file's line count, trimmed at the
end) and text columns are collected per block. A block that contradicts the first one (text
in a column whose first block was all numbers) raises `Fallback`, and the caller reads the
file the general way (`flame.data.readers.read_tables`), which handles and reports such cells.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from flame.data.encodings import detect_encoding, read_head
from flame.data.readers import MISSING_MARKERS, ReadReport, recover_numbers, to_numpy
from flame.errors import DataError

__all__ = ["Fallback", "read_csv_columns"]

BLOCK_SIZE = 64 * 1024
"""Small blocks keep the working set small; pyarrow still parses them on all cores."""


class Fallback(Exception):
    """This file needs the general reader (types change after the first block)."""


Where = Path | Callable[[], IO[bytes]]
"""A file on disk, or a function opening it from its start (a descriptor in the child)."""


@contextlib.contextmanager
def _opened(where: Where) -> Iterator[Path | IO[bytes]]:
    if isinstance(where, Path):
        yield where  # pyarrow opens it natively
    else:
        with where() as handle:
            yield handle


def _line_count(where: Where) -> int:
    """Newlines + 1: at least the number of records. Read in 1 MiB pieces (a memory map
    would count the whole file toward this process's RSS)."""
    count = 1
    opened: Any = where.open("rb", buffering=0) if isinstance(where, Path) else where()
    with opened as handle:
        piece = bytearray(1 << 20)
        view = memoryview(piece)
        while True:
            got = handle.readinto(view)
            if not got:
                return count
            count += piece.count(b"\n", 0, got)


def _options(
    delimiter: str, types: dict[str, pa.DataType] | None, include: list[str] | None = None
) -> dict[str, object]:
    return {
        "read_options": pacsv.ReadOptions(block_size=BLOCK_SIZE),
        "parse_options": pacsv.ParseOptions(delimiter=delimiter),
        "convert_options": pacsv.ConvertOptions(
            null_values=list(MISSING_MARKERS),
            strings_can_be_null=True,
            column_types=types,
            include_columns=include or [],
        ),
        "memory_pool": pa.system_memory_pool(),
    }


def _nan() -> pa.Scalar:
    return pa.Array.from_buffers(pa.float64(), 1, [None, pa.py_buffer(np.array([np.nan]))])[0]


def read_csv_columns(
    name: str,
    path: Where,
    report: ReadReport,
    delimiter: str = ",",
    encoding: str | None = None,
    project: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """One CSV file as `{column: numpy}`; raises `Fallback` when the general reader must
    (also for text that is not UTF-8: the general reader transcodes and reports)."""
    with _opened(path) as where:
        head = read_head(where)
    if detect_encoding(head, encoding)[0] != "utf-8":
        raise Fallback
    try:
        with _opened(path) as where, pacsv.open_csv(where, **_options(delimiter, None)) as sniff:
            schema = sniff.schema
    except (pa.ArrowInvalid, OSError):
        raise Fallback from None
    names = schema.names
    if project is not None:  # projection: the other columns are never converted or kept
        unknown = [column for column in project if column not in names]
        if unknown:
            raise DataError(f"{name!r} has no column {unknown[0]!r} (it has {len(names)})")
        schema = pa.schema([schema.field(column) for column in project])
        names = list(project)
    repeated = sorted({column for column in names if names.count(column) > 1})
    if repeated:
        raise DataError(f"{name!r} repeats the column name(s) {', '.join(map(repr, repeated))}")
    numeric = {
        f.name
        for f in schema
        if pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_null(f.type)
    }
    types = {n: pa.float64() if n in numeric else pa.string() for n in names}
    rows = _line_count(path)
    out = {n: np.empty(rows, dtype=np.float64) for n in numeric}
    text: dict[str, list[pa.Array]] = {n: [] for n in names if n not in numeric}
    missing = dict.fromkeys(names, 0)
    nan = _nan()
    position = 0
    try:
        options = _options(delimiter, types, names if project is not None else None)
        with _opened(path) as where, pacsv.open_csv(where, **options) as reader:
            for batch in reader:
                count = batch.num_rows
                if position + count > rows:  # cannot happen: rows >= lines >= records
                    raise Fallback
                for column_name, column in zip(names, batch.columns, strict=True):
                    missing[column_name] += column.null_count
                    if column_name in text:
                        text[column_name].append(column)
                        continue
                    if column.null_count:
                        column = pc.fill_null(column, nan)
                    start = column.offset
                    values = np.frombuffer(column.buffers()[1], dtype=np.float64)
                    out[column_name][position : position + count] = values[start : start + count]
                position += count
    except pa.ArrowInvalid:  # e.g. text below the first block in a numeric column
        raise Fallback from None
    columns: dict[str, np.ndarray] = {}
    for column_name in names:
        if column_name in out:
            array = out.pop(column_name)
            array.resize(position, refcheck=False)
            columns[column_name] = array
        else:
            chunked = pa.chunked_array(text.pop(column_name), type=pa.string())
            recovered = recover_numbers(column_name, chunked, [(name, position)], report)
            columns[column_name] = to_numpy(recovered)
        if missing[column_name]:
            report.missing[column_name] = report.missing.get(column_name, 0) + missing[column_name]
    return columns

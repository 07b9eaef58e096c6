"""The `data` handle an analysis receives: the same calls on a laptop and on a node.

A handle wraps one or more *sources* (`flame.data.sources`: a local folder, HTTP files, FHIR, S3,
SQL). Tables are Apache Arrow: `table()` gives a `pyarrow.Table`, `read_csv()` numpy
columns, `to_pandas()` / `to_polars()` DataFrames, `sql()` DuckDB over the node's files.
Missing values are never silent: they become null/NaN and are counted in `missing`.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from flame.data.sources.base import FileSource
from flame.data.sources.descriptor import DescriptorSource, Opener
from flame.data.sources.local import LocalSource, MemorySource
from flame.errors import DataError

if TYPE_CHECKING:  # pyarrow is imported on the first table read (keeps start-up fast)
    import pyarrow as pa

__all__ = ["Data", "FileSource", "LocalSource", "MemorySource", "Table"]

# Tables parsed at once in this process. A node reads one at a time anyway; an in-process
# simulation runs every node's `analyze` in its own thread, and ten nodes parsing at once held
# every node's parse buffers together (W1 in benchmarks/simulate_scale.py) on two cores that
# parse no faster for it. Only the parse waits: `analyze` itself may block on messages.
_PARSING = threading.BoundedSemaphore(max(2, len(os.sched_getaffinity(0))))

Table = dict[str, "np.ndarray"]


class Data:
    """This node's data. Files come from the first file source unless `source=` names another."""

    def __init__(self, sources: Mapping[str, object] | None = None, *, node_id: str = "") -> None:
        self.node_id = node_id
        self._sources: dict[str, object] = dict(sources or {})
        self._engines: dict[str, Any] = {}
        self.missing: dict[str, int] = {}
        """Missing cells per column in the last table read (now NaN / null)."""
        self.invalid: dict[str, int] = {}
        """Stray text cells per numeric column in the last table read (now NaN / null)."""

    @classmethod
    def from_path(cls, root: str | Path, node_id: str = "") -> Data:
        return cls({"local": LocalSource(root)}, node_id=node_id)

    @property
    def sources(self) -> dict[str, object]:
        return dict(self._sources)

    def source(self, name: str | None = None) -> object:
        """A configured source by name (e.g. a FHIR source for `.search()`)."""
        if name is None:
            if not self._sources:
                raise DataError(f"node {self.node_id!r} has no data source configured")
            return next(iter(self._sources.values()))
        try:
            return self._sources[name]
        except KeyError:
            known = ", ".join(self._sources) or "none"
            raise DataError(f"no data source named {name!r} (configured: {known})") from None

    def has_files(self) -> bool:
        """Whether any source serves files (FHIR sources serve resources instead)."""
        return any(isinstance(s, FileSource) for s in self._sources.values())

    def _files_source(self, source: str | None) -> FileSource:
        if source is None:
            for candidate in self._sources.values():
                if isinstance(candidate, FileSource):
                    return candidate
            raise DataError(f"node {self.node_id!r} has no file data source")
        found = self.source(source)
        if not isinstance(found, FileSource):
            raise DataError(f"data source {source!r} does not serve files")
        return found

    def files(self, pattern: str = "*", *, source: str | None = None) -> list[str]:
        """File names matching a glob pattern (`*` also matches across folders)."""
        return [f for f in self._files_source(source).files() if fnmatch.fnmatch(f, pattern)]

    def open(self, name: str, *, source: str | None = None) -> IO[bytes]:
        return self._files_source(source).open(name)

    def read_bytes(self, name: str, *, source: str | None = None) -> bytes:
        with self.open(name, source=source) as stream:
            return stream.read()

    def read_text(self, name: str, *, source: str | None = None, encoding: str = "utf-8") -> str:
        """The file as text; a UTF-8 byte-order mark (Excel's CSV export) is dropped."""
        if encoding.lower().replace("_", "-") == "utf-8":
            encoding = "utf-8-sig"
        try:
            return self.read_bytes(name, source=source).decode(encoding)
        except UnicodeDecodeError as exc:
            raise DataError(f"{name!r} is not {encoding} text: {exc.reason}") from None

    def rows(self, name: str, *, source: str | None = None) -> Iterator[dict[str, str]]:
        """The rows of one CSV file as dicts of header -> cell text."""
        text = self.read_text(name, source=source)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        repeated = sorted({column for column in header if header.count(column) > 1})
        if repeated:
            raise DataError(f"{name!r} repeats the column name(s) {', '.join(map(repr, repeated))}")
        for line, row in enumerate(reader, start=2):
            if None in row or any(v is None for v in row.values()):
                raise DataError(f"{name!r} line {line}: number of cells does not match the header")
            yield row

    def read_csv(
        self,
        name: str | None = None,
        *,
        source: str | None = None,
        columns: Sequence[str] | None = None,
    ) -> Table:
        """A CSV file as columns of numpy arrays (float64 where the column is numeric).

        Without a name, every `*.csv` file of the source is read and stacked; they must share
        one header. Missing markers (empty, NA, N/A, NULL, null, NaN, ".") become NaN in
        numeric columns and "" in text columns; stray text in a numeric column becomes NaN
        with a warning. Counts are in `self.missing` and `self.invalid` afterwards.
        `columns`: read only these (in this order); the others are never converted or kept,
        which is what keeps a wide file's read small.
        """
        from flame.data.columns import Columns

        with _PARSING:
            return Columns(self._read_csv(name, source, columns))

    def _read_csv(
        self, name: str | None, source: str | None, columns: Sequence[str] | None
    ) -> Table:
        names = [name] if name is not None else self.files("*.csv", source=source)
        if not names:
            raise DataError(f"node {self.node_id!r} has no CSV files")
        from flame.data.readers import to_numpy

        files = self._files_source(source)
        if isinstance(files, (LocalSource, DescriptorSource)):
            streamed = self._read_csv_streamed(files, names, columns)
            if streamed is not None:
                return streamed
        table = self._read(names, source)
        if columns is not None:
            unknown = [column for column in columns if column not in table.column_names]
            if unknown:
                known = ", ".join(map(repr, table.column_names))
                raise DataError(
                    f"no column {unknown[0]!r} in {', '.join(map(repr, names))}; "
                    f"its columns: {known}"
                )
            table = table.select(list(columns))
        out: Table = {}
        for column in table.column_names:  # release each Arrow column once it is copied
            out[column] = to_numpy(table.column(column))
            table = table.drop_columns([column])
        return out

    def _read_csv_streamed(
        self,
        files: LocalSource | DescriptorSource,
        names: list[str],
        columns: Sequence[str] | None = None,
    ) -> Table | None:
        """Local CSV files (by path, or by descriptor in an isolated child) streamed into
        numpy (`flame.data.csv_columns`); None: read generally."""
        from flame.data.csv_columns import Fallback, read_csv_columns
        from flame.data.readers import ReadReport, file_format

        report = ReadReport(files=list(names))
        parts: list[Table] = []
        for file_name in names:
            kind = file_format(file_name)
            if kind not in ("csv", "tsv"):
                return None
            where: Path | Callable[[], IO[bytes]]
            if isinstance(files, DescriptorSource):
                where = files.opener(file_name)
            else:
                where = files.path(file_name)
                if not where.is_file():
                    raise DataError(f"data source {files.name!r}: no file {file_name!r}")
            try:
                parts.append(
                    read_csv_columns(
                        file_name,
                        where,
                        report,
                        "\t" if kind == "tsv" else ",",
                        getattr(files, "encoding", None),
                        None if columns is None else list(columns),
                    )
                )
            except Fallback:
                return None
            finally:
                if isinstance(where, Opener):
                    where.close()
            if list(parts[-1]) != list(parts[0]):
                raise DataError(
                    f"{file_name!r} has columns {list(parts[-1])}, but {names[0]!r} has "
                    f"{list(parts[0])}"
                )
            if any(parts[-1][c].dtype.kind != parts[0][c].dtype.kind for c in parts[0]):
                return None  # a column typed differently across files: unify generally
        self.missing, self.invalid = report.missing, report.invalid
        if len(parts) == 1:
            return parts[0]
        return {c: np.concatenate([part[c] for part in parts]) for c in parts[0]}

    def table(self, name: str | None = None, *, source: str | None = None) -> pa.Table:
        """A table file (CSV, TSV, Parquet, JSON lines) as a `pyarrow.Table`, types kept.

        `name` may be a glob pattern; without one, every CSV file (else every Parquet, else
        every JSON-lines file) of the source is read and stacked.
        """
        return self._read(self._table_names(name, source), source)

    def to_pandas(self, name: str | None = None, *, source: str | None = None) -> Any:
        """`table(...)` as a pandas DataFrame (needs `pip install 'flame[pandas]'`)."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise DataError("to_pandas needs pandas: pip install 'flame[pandas]'") from None
        return self.table(name, source=source).to_pandas()

    def to_polars(self, name: str | None = None, *, source: str | None = None) -> Any:
        """`table(...)` as a polars DataFrame (needs `pip install 'flame[polars]'`)."""
        try:
            import polars
        except ImportError:
            raise DataError("to_polars needs polars: pip install 'flame[polars]'") from None
        return polars.from_arrow(self.table(name, source=source))

    def sql(
        self, query: str, params: Sequence[Any] | None = None, *, source: str | None = None
    ) -> pa.Table:
        """DuckDB SQL over this node's table files, each a view named after its file.

        `data.sql("select avg(age) from records")` reads `records.csv` out of core. The
        result is a `pyarrow.Table`; `?` placeholders take `params`.
        """
        from flame.data.sources.duckdb import DuckDbEngine

        files = self._files_source(source)
        key = files.name
        engine = self._engines.get(key)
        if engine is None:
            engine = self._engines[key] = DuckDbEngine(files)
        return engine.sql(query, params)

    def close(self) -> None:
        """Release DuckDB engines and source connections (idempotent)."""
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
        for item in self._sources.values():
            closer = getattr(item, "close", None)
            if callable(closer):
                closer()

    def _table_names(self, name: str | None, source: str | None) -> list[str]:
        available = self.files(source=source)
        if name is not None and any(ch in name for ch in "*?["):
            names = [f for f in available if fnmatch.fnmatch(f, name)]
        elif name is not None:
            names = [name]
        else:
            names = []
            for suffixes in ((".csv",), (".parquet", ".pq"), (".jsonl", ".ndjson"), (".tsv",)):
                names = [f for f in available if f.lower().endswith(suffixes)]
                if names:
                    break
        if not names:
            from flame.data.readers import FORMATS

            known = ", ".join(sorted(FORMATS))
            raise DataError(f"node {self.node_id!r} has no table files ({known}) matching {name!r}")
        return names

    def _read(self, names: list[str], source: str | None) -> pa.Table:
        from flame.data.readers import read_tables

        files = self._files_source(source)
        with ExitStack() as stack:
            entries: list[tuple[str, Path | IO[bytes]]] = []
            for file_name in names:
                if isinstance(files, LocalSource):  # read natively (not wrapped or metered)
                    path = files.path(file_name)
                    if not path.is_file():
                        raise DataError(f"data source {files.name!r}: no file {file_name!r}")
                    entries.append((file_name, path))
                else:
                    entries.append((file_name, stack.enter_context(files.open(file_name))))
            table, report = read_tables(entries, getattr(files, "encoding", None))
        self.missing = report.missing
        self.invalid = report.invalid
        return table

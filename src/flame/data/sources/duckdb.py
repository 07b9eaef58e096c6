"""SQL over the node's own files with DuckDB: `data.sql("select avg(age) from records")`.

Every CSV, Parquet and JSON-lines file of a file source becomes a view named after the file
(`records.csv` -> `records`, `visits/2024.parquet` -> `visits_2024`); DuckDB scans the files
itself, in parallel and out of core (a memory limit and a spill folder are set), so a file
larger than memory can be aggregated. Files of remote sources (HTTP, S3) are downloaded to a
temporary folder first. Missing markers (NA, NULL, ...) read as NULL.

`duckdb` is imported on first use: `pip install 'flame[duckdb]'`.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from flame.data.sources.base import FileSource
from flame.data.sources.local import LocalSource
from flame.errors import DataError

__all__ = ["DuckDbEngine", "table_name"]

log = logging.getLogger(__name__)

MISSING_MARKERS = ("", "NA", "N/A", "NULL", "null", "NaN", ".")
_READERS = {
    ".csv": "read_csv",
    ".tsv": "read_csv",
    ".parquet": "read_parquet",
    ".pq": "read_parquet",
    ".jsonl": "read_json",
    ".ndjson": "read_json",
}


def table_name(file_name: str) -> str:
    """The view name of a file: its path without the suffix, non-word characters as '_'."""
    stem = file_name.rsplit(".", 1)[0]
    name = re.sub(r"\W", "_", stem)
    return name if not name[:1].isdigit() else "t_" + name


def _copy_in_kernel(stream: Any, out: Any) -> bool:
    """Copy a real file (an isolated child's descriptor) without passing it through Python;
    False when `stream` is not one or the kernel cannot."""
    try:
        source, target = stream.fileno(), out.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    import os

    copy = getattr(os, "copy_file_range", None)
    try:
        while True:
            if copy is not None:
                done = copy(source, target, 64 << 20)
            else:
                done = os.sendfile(target, source, None, 64 << 20)
            if done == 0:
                return True
    except OSError:
        if os.lseek(target, 0, os.SEEK_CUR) == 0:
            return False  # nothing written: copy in Python instead
        raise


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class DuckDbEngine:
    """One in-memory DuckDB database per source, with a view per data file."""

    def __init__(
        self, source: FileSource, *, memory_limit: str = "512MB", threads: int | None = None
    ) -> None:
        try:
            import duckdb
        except ImportError:  # pragma: no cover - depends on the installation
            raise DataError("data.sql needs DuckDB: pip install 'flame[duckdb]'") from None
        self.source = source
        self._spill = Path(tempfile.mkdtemp(prefix="flame-duckdb-"))
        config: dict[str, Any] = {
            "memory_limit": memory_limit,
            "temp_directory": str(self._spill / "spill"),
        }
        if threads is not None:
            config["threads"] = threads
        self._db = duckdb.connect(":memory:", config=config)
        self.tables: dict[str, str] = {}
        for name in source.files():
            reader = _READERS.get(Path(name).suffix.lower())
            if reader is None:
                continue
            view = table_name(name)
            if view in self.tables:
                raise DataError(
                    f"data source {source.name!r}: {name!r} and {self.tables[view]!r} would "
                    f"both be table {view!r}"
                )
            path = self._local_path(name)
            scan = self._scan(reader, path)  # the view name is \w only, the path a quoted literal
            self._db.execute(f'create view "{view}" as select * from {scan}')  # noqa: S608
            self.tables[view] = name

    def _local_path(self, name: str) -> Path:
        if isinstance(self.source, LocalSource):  # DuckDB scans it in place
            return self.source.path(name)
        target = self._spill / "files" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with self.source.open(name) as stream, target.open("wb") as out:
            if not _copy_in_kernel(stream, out):
                shutil.copyfileobj(stream, out, 1024 * 1024)
        return target

    @staticmethod
    def _scan(reader: str, path: Path) -> str:
        if reader == "read_csv":
            markers = ", ".join(_literal(m) for m in MISSING_MARKERS)
            return f"read_csv({_literal(str(path))}, nullstr = [{markers}], header = true)"
        return f"{reader}({_literal(str(path))})"

    def sql(self, query: str, params: Sequence[Any] | None = None) -> pa.Table:
        """The query's result as a `pyarrow.Table` (`?` placeholders for `params`)."""
        import duckdb

        try:
            relation: Any = self._db.sql(query, params=list(params) if params is not None else None)
            if relation is None:  # a statement without a result
                return pa.table({})
            fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
            table: pa.Table = fetch()
            return table
        except duckdb.Error as exc:
            from flame.privacy.quoting import quote_parser_message

            known = ", ".join(sorted(self.tables)) or "none"
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            hint = "parameter" in first.lower()  # `%s` written for psycopg, or a count off
            first = quote_parser_message(first)  # "Could not convert string 'x'": data
            if hint:
                first += "; data.sql takes `?` placeholders (as SQL sources do), one per param"
            raise DataError(
                f"data source {self.source.name!r}: SQL failed: {first} (tables: {known})"
            ) from None

    def close(self) -> None:
        self._db.close()
        shutil.rmtree(self._spill, ignore_errors=True)

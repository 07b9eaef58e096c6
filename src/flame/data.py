"""The `data` handle an analysis receives: the same calls on a laptop and on a node.

A handle wraps one or more *sources* (a local folder here; HTTP, FHIR and S3 sources live in
`flame.clients.data_api_client`). File-like sources implement `FileSource`.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import math
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import IO, Protocol, runtime_checkable

import numpy as np

from flame.errors import DataError

__all__ = ["Data", "FileSource", "LocalSource", "MemorySource", "Table"]

Table = dict[str, "np.ndarray"]


@runtime_checkable
class FileSource(Protocol):
    """A source of named files: what a node folder, an HTTP file API or a bucket share."""

    name: str

    def files(self) -> list[str]:
        """All file names, relative, '/'-separated, sorted."""
        ...

    def open(self, name: str) -> IO[bytes]:
        """A binary stream of one file; the caller closes it."""
        ...


def _safe_relative(name: str) -> str:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise DataError(f"file name {name!r} must be relative and stay inside the source")
    return str(path)


class LocalSource:
    """A directory on this machine (what `flame simulate` gives each node)."""

    def __init__(self, root: str | Path, name: str = "local") -> None:
        self.root = Path(root)
        self.name = name
        if not self.root.is_dir():
            raise DataError(f"data source {name!r}: {self.root} is not a directory")

    def files(self) -> list[str]:
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
        )

    def open(self, name: str) -> IO[bytes]:
        path = self.root / _safe_relative(name)
        try:
            return path.open("rb")
        except OSError as exc:
            raise DataError(
                f"data source {self.name!r}: cannot read {name!r}: {exc.strerror}"
            ) from None


class MemorySource:
    """Files held in memory: for tests of an analysis (`flame.testing`)."""

    def __init__(self, files: Mapping[str, bytes | str], name: str = "memory") -> None:
        self.name = name
        self._files = {
            _safe_relative(k): v.encode() if isinstance(v, str) else bytes(v)
            for k, v in files.items()
        }

    def files(self) -> list[str]:
        return sorted(self._files)

    def open(self, name: str) -> IO[bytes]:
        try:
            return io.BytesIO(self._files[_safe_relative(name)])
        except KeyError:
            raise DataError(f"data source {self.name!r}: no file {name!r}") from None


def _column(values: list[str]) -> np.ndarray:
    """Numeric when every non-empty cell parses as a number (empty -> NaN), else text."""
    parsed: list[float] = []
    for cell in values:
        text = cell.strip()
        if not text:
            parsed.append(math.nan)
            continue
        try:
            parsed.append(float(text))
        except ValueError:
            return np.array(values, dtype=str)
    return np.array(parsed, dtype=np.float64)


class Data:
    """This node's data. Files come from the first file source unless `source=` names another."""

    def __init__(self, sources: Mapping[str, object] | None = None, *, node_id: str = "") -> None:
        self.node_id = node_id
        self._sources: dict[str, object] = dict(sources or {})

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

    def read_csv(self, name: str | None = None, *, source: str | None = None) -> Table:
        """A CSV file as columns of numpy arrays (float where every cell is numeric).

        Without a name, every `*.csv` file of the source is read and stacked; they must share
        one header. This is what an analysis usually wants from a node with several files.
        """
        names = [name] if name is not None else self.files("*.csv", source=source)
        if not names:
            raise DataError(f"node {self.node_id!r} has no CSV files")
        header: list[str] | None = None
        cells: dict[str, list[str]] = {}
        for file_name in names:
            rows = list(self.rows(file_name, source=source))
            file_header = list(rows[0].keys()) if rows else self._header(file_name, source)
            if header is None:
                header = file_header
                cells = {column: [] for column in header}
            elif file_header != header:
                raise DataError(
                    f"{file_name!r} has columns {file_header}, but {names[0]!r} has {header}"
                )
            for row in rows:
                for column in header:
                    cells[column].append(row[column])
        return {column: _column(values) for column, values in cells.items()}

    def _header(self, name: str, source: str | None) -> list[str]:
        first = self.read_text(name, source=source).splitlines()[:1]
        return next(csv.reader(first), []) if first else []

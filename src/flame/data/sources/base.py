"""The one protocol every data source follows, and the file-serving refinement of it.

A source has a `name` and may have `probe()` (touch the service once at start-up so a bad
token or password stops the node before any work) and `close()`. File sources (a node
folder, an HTTP file API, a bucket) add `files()` and `open()`; query sources (SQL) add
`query()`; FHIR adds `search()`.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import IO, Protocol, runtime_checkable

from flame.errors import DataError

__all__ = ["FileSource", "Source", "safe_relative"]


@runtime_checkable
class Source(Protocol):
    """Anything a node reads data from, known by its configured name."""

    name: str


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


def safe_relative(name: str) -> str:
    """`name` if it is relative and stays inside its source; DataError otherwise."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise DataError(f"file name {name!r} must be relative and stay inside the source")
    return str(path)

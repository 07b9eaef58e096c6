"""Files on this machine (a node folder) or held in memory (tests of an analysis)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Literal

from flame.data.encodings import normalize_encoding
from flame.data.sources.base import safe_relative
from flame.errors import DataError

__all__ = ["LocalSource", "MemorySource", "dot_name"]


def dot_name(relative: str) -> bool:
    """Whether a relative '/'-separated name has a part starting with '.' (hidden files,
    `.git`, editors' temp files): no local source lists, reads or fingerprints those."""
    return any(part.startswith(".") for part in relative.split("/"))


class LocalSource:
    """A directory on this machine (what `flame simulate` gives each node)."""

    kind: Literal["local"] = "local"

    def __init__(
        self, root: str | Path, name: str = "local", *, encoding: str | None = None
    ) -> None:
        self.root = Path(root)
        self.name = name
        if not self.root.is_dir():
            raise DataError(f"data source {name!r}: {self.root} is not a directory")
        self.encoding = None
        if encoding is not None:
            try:
                self.encoding = normalize_encoding(encoding)
            except ValueError as exc:
                raise DataError(f"data source {name!r}: {exc}") from None

    def files(self) -> list[str]:
        """Every regular file below the folder, except names with a part starting with '.'
        (which `path` refuses, so what is listed is what can be read)."""
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and not dot_name(p.relative_to(self.root).as_posix())
        )

    def path(self, name: str) -> Path:
        """The file's path on disk, so readers (pyarrow, DuckDB) can read it natively."""
        relative = safe_relative(name)
        if dot_name(relative):
            raise DataError(
                f"data source {self.name!r}: {name!r} starts with '.', which is not a data file"
            )
        return self.root / relative

    def open(self, name: str) -> IO[bytes]:
        try:
            return self.path(name).open("rb")
        except OSError as exc:
            raise DataError(
                f"data source {self.name!r}: cannot read {name!r}: {exc.strerror}"
            ) from None


class MemorySource:
    """Files held in memory: for tests of an analysis (`flame.testing`)."""

    kind: Literal["memory"] = "memory"

    def __init__(self, files: Mapping[str, bytes | str], name: str = "memory") -> None:
        self.name = name
        self._files = {
            safe_relative(k): v.encode() if isinstance(v, str) else bytes(v)
            for k, v in files.items()
        }

    def files(self) -> list[str]:
        return sorted(self._files)

    def open(self, name: str) -> IO[bytes]:
        try:
            return io.BytesIO(self._files[safe_relative(name)])
        except KeyError:
            raise DataError(f"data source {self.name!r}: no file {name!r}") from None

"""A node folder read through file descriptors: the isolated analysis child's view of it.

The child may not open the node's data folder by path (its Landlock domain hides the node's
paths, keys and tokens alike). It asks the node runtime for one file at a time; the runtime
checks the name, opens the file read-only and passes the open descriptor over the channel.
The child then reads it like a local file: pyarrow and `flame.data.csv_columns` stream it in
blocks, DuckDB gets a kernel-side copy it scans out of core. Nothing but the file's bytes is
reachable through the descriptor (it is read-only, and `/proc/self/fd/N` re-opens by path,
which the domain refuses).
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import stat
from collections.abc import Callable, Sequence
from typing import IO, Any, Literal, cast

from flame.errors import DataError

__all__ = [
    "DescriptorSource",
    "count_records",
    "open_read_only",
    "reachable",
    "resolve_node_file",
]


class DescriptorSource:
    """Files of a node folder, each opened by the runtime on request (`fetch(name) -> fd`)."""

    kind: Literal["descriptor"] = "descriptor"

    def __init__(
        self, name: str, list_files: Callable[[], list[str]], fetch: Callable[[str], int]
    ) -> None:
        self.name = name
        self._list = list_files
        self._fetch = fetch

    def files(self) -> list[str]:
        return list(self._list())

    def descriptor(self, name: str) -> int:
        """A new read-only descriptor of `name` (the caller closes it)."""
        return self._fetch(name)

    def open(self, name: str) -> IO[bytes]:
        return os.fdopen(self.descriptor(name), "rb")

    def opener(self, name: str) -> Opener:
        """A function opening `name` from its start, as often as a reader needs (one
        descriptor, duplicated per open)."""
        fd = self.descriptor(name)
        size = os.fstat(fd).st_size

        def reopen() -> IO[bytes]:
            """A reader with its own offset over the shared descriptor (pread). Not a memory
            map: every page of a mapped file that is read counts toward the child's RSS
            (a 2 GB CSV added 2 GB to the peak), pread's pages stay in the page cache."""
            return cast("IO[bytes]", io.BufferedReader(_PreadFile(fd, size), 1 << 20))

        return Opener(fd, reopen)


class _PreadFile(io.RawIOBase):
    """A read-only, seekable view of a descriptor that never moves the descriptor's offset,
    so several readers (the row count, the parser) can use one descriptor at once."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__()
        self._fd = fd
        self._size = size
        self._at = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), max(self._size - self._at, 0))
        if wanted == 0:
            return 0
        got = os.preadv(self._fd, [view[:wanted]], self._at)
        self._at += got
        return got

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._at, os.SEEK_END: self._size}[whence]
        self._at = max(base + offset, 0)
        return self._at

    def tell(self) -> int:
        return self._at


class Opener:
    """`reopen()` callable that closes the original descriptor when garbage collected."""

    def __init__(self, fd: int, reopen: Callable[[], IO[bytes]]) -> None:
        self._fd = fd
        self._reopen = reopen

    def __call__(self) -> IO[bytes]:
        if self._fd < 0:
            raise ValueError("this file was closed")
        return self._reopen()

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()


_PIECE = 4 * 1024 * 1024  # per reading thread: 10 nodes reading at once hold 10 pieces


def _simple_lines(fd: int, size: int, quoted: bool, delimiter: int = 44) -> int | None:
    """Non-empty lines of the file (CSV: newlines outside quoted fields), counted with numpy
    over a memory map in pieces; None when the file needs the exact parser (a carriage
    return, an empty line, or a quote that is neither at a field's edge nor doubled)."""
    import numpy as np

    if size == 0:
        return 0

    def read(start: int, length: int) -> Any:
        # pread, not a memory map: a mapped file's pages count toward this process's RSS
        return np.frombuffer(os.pread(fd, length, start), dtype=np.uint8)

    return _count_pieces(read, size, quoted, delimiter)


def _count_pieces(
    read: Callable[[int, int], Any], size: int, quoted: bool, delimiter: int
) -> int | None:
    """`read(start, length)`: the file's bytes as a uint8 array; one piece at a time, each
    with a byte of its neighbours on either side (a quote's edge may lie across a cut)."""
    import numpy as np

    if read(0, 1)[0] == 10:
        return None
    lines, quote_parity, last_newline = 0, 0, -2
    edge = np.array([10, delimiter, 34], dtype=np.uint8)
    for start in range(0, size, _PIECE):
        low, high = max(start - 1, 0), min(start + _PIECE + 1, size)
        halo = read(low, high - low)
        shift = start - low  # 0 for the first piece, else 1
        piece = halo[shift : min(start + _PIECE, size) - low]
        if bool(np.any(piece == 13)):
            return None
        newlines = np.flatnonzero(piece == 10) + start
        if newlines.size and (
            newlines[0] == last_newline + 1 or bool(np.any(np.diff(newlines) == 1))
        ):
            return None  # an empty line
        if newlines.size:
            last_newline = int(newlines[-1])
        if quoted:
            local = np.flatnonzero(piece == 34) + shift  # positions in `halo`
            quotes = local - shift + start
            if quotes.size:
                before = np.where(quotes > 0, halo[np.maximum(local - 1, 0)], 10)
                last = len(halo) - 1
                after = np.where(quotes < size - 1, halo[np.minimum(local + 1, last)], 10)
                if not bool(np.all(np.isin(before, edge) | np.isin(after, edge))):
                    return None
            # Also in a piece without quotes: a field opened in an earlier piece may span it.
            inside = (np.searchsorted(quotes, newlines) + quote_parity) % 2 == 1
            newlines = newlines[~inside]
            quote_parity = (quote_parity + int(quotes.size)) % 2
        lines += int(newlines.size)
    if quote_parity:
        return None  # an unclosed quote
    return lines + (0 if read(size - 1, 1)[0] == 10 else 1)


def count_records(name: str, fd: int) -> int:
    """Data records (rows) of a table file, as the runtime's row meter counts them: CSV/TSV
    records without the header, non-empty JSON lines, Parquet rows; 0 for other files.
    Reads through `fd` without moving its offset (the analysis reads it after)."""
    import csv

    lower = name.lower()
    size = os.fstat(fd).st_size
    if lower.endswith((".parquet", ".pq")):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as view:
                return int(pq.ParquetFile(pa.BufferReader(pa.py_buffer(view))).metadata.num_rows)
        except (OSError, ValueError, pa.ArrowException):
            return 0  # unreadable: no rows counted, min_rows decides
    table = lower.endswith((".csv", ".tsv"))
    if not table and not lower.endswith((".jsonl", ".ndjson")):
        return 0
    fast = _simple_lines(fd, size, table, 9 if lower.endswith(".tsv") else 44)
    if fast is not None:
        return max(fast - 1, 0) if table else fast
    content = os.pread(fd, size, 0) if size else b""
    if not table:
        return sum(1 for line in content.splitlines() if line.strip())
    text = content.decode("utf-8-sig", errors="replace")
    dialect = "excel-tab" if lower.endswith(".tsv") else "excel"
    records = sum(1 for row in csv.reader(io.StringIO(text, newline=""), dialect) if row)
    return max(records - 1, 0)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def resolve_node_file(root: str | os.PathLike[str], name: str, hidden: Sequence[str] = ()) -> str:
    """The one path check for every file the analysis asks for (`open`, `read`, `files`,
    flame.dp reads): the real path of `name` in the folder `root`. Refused: names leaving
    the folder (`..`, absolute) and a name that resolves (through symlinks) into one of the
    node's `hidden` paths (keys, tokens, policy) other than the data folder itself, and a
    name with a part starting with '.': what `LocalSource.files()` lists (and the data
    version fingerprints) is what can be read."""
    from flame.data.sources.base import safe_relative
    from flame.data.sources.local import dot_name

    relative = safe_relative(name)
    if dot_name(relative):
        raise DataError(f"cannot read {name!r}: names starting with '.' are not data files")
    base = os.path.realpath(root)
    real = os.path.realpath(os.path.join(base, *relative.split("/")))
    for secret in hidden:
        if _within(real, secret) and not _within(base, secret):
            raise DataError(f"cannot read {name!r}: it leads into a path hidden from analyses")
    return real


def reachable(root: str | os.PathLike[str], name: str, hidden: Sequence[str] = ()) -> bool:
    """Whether `resolve_node_file` lets the analysis have `name` (for listings)."""
    try:
        resolve_node_file(root, name, hidden)
    except (DataError, ValueError):
        return False
    return True


def open_read_only(root: str | os.PathLike[str], name: str, hidden: Sequence[str] = ()) -> int:
    """The runtime's side: `name` of the folder `root` (`resolve_node_file`) opened
    read-only, for the child; anything but a regular file is refused."""
    real = resolve_node_file(root, name, hidden)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise DataError(f"cannot read {name!r}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DataError(f"cannot read {name!r}: not a regular file")
    return fd

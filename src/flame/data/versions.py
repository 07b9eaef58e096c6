"""What version of its data a node's run uses: each local file's fingerprint, taken when the
run starts and checked before and after every epoch's analyze.

Why: a file replaced or rewritten between epochs (a nightly export landing mid-study) made
later epochs compute on other data than earlier ones, silently. Now such a run fails at the
next check, naming the source and the file; the fingerprint digest goes into the node's
statuses, so the aggregator's history (and manifest) says which data version each epoch used.

A fingerprint is size, modification time, status-change time (ctime: `utime` can put an
mtime back, not a ctime), inode and the SHA-256 of the file's first MiB, all from one open
descriptor. Every file a local source lists is fingerprinted, however many (a check costs
one open, stat and head hash per file); names starting with '.' are neither listed nor
readable by the analysis (`LocalSource.files`, `resolve_node_file`). Files of local
sources only (a folder on this machine); SQL, HTTP, FHIR and S3 sources are not covered.

Why the head is re-hashed at every check, not only when the stat changed: an unprivileged
writer can rewrite a file in place keeping size, mtime, ctime and inode. Stores through a
shared writable mapping (`mmap`) move the times only when a clean page is first written;
to a page already dirty they move nothing until writeback cleans it (about 30 s on ext4,
never on tmpfs: measured on Linux 6.18), and two `write` calls in one tick of the coarse
file clock (a few ms, before multigrain timestamps) leave one ctime. The hash catches those
rewrites within the first MiB (tests/test_data_versions.py maps and rewrites a file); beyond
it they go unseen. What the two checks cost an epoch: benchmarks/data_versions.py (1 % to
17 % of an epoch whose analysis reads every file, 1,000 small or 100 large ones).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flame.data.sources.local import LocalSource
from flame.errors import DataError

__all__ = ["DataVersions", "Fingerprint"]

log = logging.getLogger(__name__)

_HEAD = 1024 * 1024  # bytes hashed per file


@dataclass(frozen=True)
class Fingerprint:
    size: int
    mtime_ns: int
    inode: int
    head_sha256: str
    ctime_ns: int = 0

    def differs(self, other: Fingerprint) -> str | None:
        """How `other` (now) differs from this one (at start), in words; None: the same."""
        if other.inode != self.inode:
            return "it was replaced by another file"
        if other.size != self.size:
            return f"its size changed from {self.size} to {other.size} bytes"
        if other.mtime_ns != self.mtime_ns:
            return "it was modified"
        if self.head_sha256 and other.head_sha256 and other.head_sha256 != self.head_sha256:
            return "its content was rewritten in place"
        if other.ctime_ns != self.ctime_ns:
            return "it was rewritten or its attributes changed in place (ctime moved)"
        return None


def _stat(path: Path, *, hash_head: bool) -> Fingerprint:
    """The stat and the head's hash of one open file (no rename can come between them)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        digest = ""
        if hash_head:
            hasher = hashlib.sha256()
            left = _HEAD
            while left > 0:
                chunk = os.read(fd, left)
                if not chunk:
                    break
                hasher.update(chunk)
                left -= len(chunk)
            digest = hasher.hexdigest()
    finally:
        os.close(fd)
    return Fingerprint(info.st_size, info.st_mtime_ns, info.st_ino, digest, info.st_ctime_ns)


class DataVersions:
    """Fingerprints of every file of a node's local sources, taken once (`take`)."""

    def __init__(self) -> None:
        self._files: dict[tuple[str, str], tuple[Path, Fingerprint]] = {}
        self._sources: dict[str, LocalSource] = {}

    @classmethod
    def take(cls, sources: Mapping[str, object]) -> DataVersions:
        versions = cls()
        for name, source in sources.items():
            if not isinstance(source, LocalSource):
                continue
            versions._sources[name] = source
            for file in source.files():  # all of them: a file left out could change unseen
                path = source.path(file)
                try:
                    versions._files[(name, file)] = (path, _stat(path, hash_head=True))
                except OSError as exc:
                    raise DataError(
                        f"data source {name!r}: cannot read {file!r}: {exc.strerror}"
                    ) from None
        return versions

    @functools.cached_property
    def digest(self) -> str:
        """One SHA-256 over every fingerprint: the data version, for statuses and history."""
        hasher = hashlib.sha256()
        for (source, file), (_, print_) in sorted(self._files.items()):
            hasher.update(
                f"{source}\0{file}\0{print_.size}\0{print_.mtime_ns}\0{print_.head_sha256}\n".encode()
            )
        return hasher.hexdigest()

    @property
    def count(self) -> int:
        return len(self._files)

    def check(self) -> None:
        """DataError naming the first file that changed, vanished or appeared since `take`."""
        for (source, file), (path, before) in self._files.items():
            try:
                now = _stat(path, hash_head=True)
            except OSError:
                raise DataError(
                    f"data source {source!r}: {file!r} was removed during the run; "
                    "restart the run to use the new data"
                ) from None
            change = before.differs(now)
            if change is not None:
                raise DataError(
                    f"data source {source!r}: {file!r} changed during the run ({change}); "
                    "an epoch would compute on other data than the earlier ones: restart "
                    "the run to use the new data"
                )
        for name, local in self._sources.items():
            known = {file for (owner, file) in self._files if owner == name}
            added = [file for file in local.files() if file not in known]
            if added:
                raise DataError(
                    f"data source {name!r}: {added[0]!r} appeared during the run; restart "
                    "the run to use the new data"
                )

"""A node's data version (flame.data.versions): a file that changes during a run is named."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from flame.data.sources.local import LocalSource, MemorySource
from flame.data.versions import DataVersions
from flame.errors import DataError


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "records.csv").write_text("value\n1\n2\n3\n")
    (folder / "other.csv").write_text("value\n4\n")
    return folder


def _versions(folder: Path) -> DataVersions:
    return DataVersions.take({"default": LocalSource(folder), "mem": MemorySource({"a": "1"})})


def test_unchanged_data_passes_and_has_one_digest(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    versions = _versions(folder)
    versions.check()
    assert versions.count == 2  # local files only
    assert versions.digest == _versions(folder).digest
    (folder / "records.csv").write_text("value\n1\n2\n4\n")
    assert _versions(folder).digest != versions.digest


@pytest.mark.parametrize("change", ["replaced", "rewritten", "same size", "removed", "added"])
def test_a_change_during_the_run_names_the_file(tmp_path: Path, change: str) -> None:
    folder = _folder(tmp_path)
    versions = _versions(folder)
    target = folder / "records.csv"
    if change == "replaced":  # a new export moved into place, with an old modification time
        fresh = tmp_path / "fresh.csv"
        fresh.write_text("value\n9\n9\n9\n")
        stat = target.stat()
        os.utime(fresh, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.replace(fresh, target)
    elif change == "rewritten":
        target.write_text("value\n1\n")
    elif change == "same size":
        stat = target.stat()
        target.write_text("value\n7\n8\n9\n")
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    elif change == "removed":
        target.unlink()
    else:
        (folder / "late.csv").write_text("value\n5\n")
    with pytest.raises(DataError) as caught:
        versions.check()
    text = str(caught.value)
    assert "'default'" in text
    assert ("'late.csv'" if change == "added" else "'records.csv'") in text
    assert "9" not in text.replace("'", "")  # no values of the file in the message


def test_a_same_size_rewrite_with_the_old_mtime_is_caught(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    versions = _versions(folder)
    target = folder / "records.csv"
    stat = target.stat()
    target.write_text("value\n7\n8\n9\n")  # same size
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime
    assert target.stat().st_size == stat.st_size
    with pytest.raises(DataError, match=r"'records\.csv'"):
        versions.check()


def test_a_rewrite_through_a_mapping_that_keeps_every_stat_field_is_caught(
    tmp_path: Path,
) -> None:
    """A store to a page already dirty moves no time (Linux: until writeback, never on tmpfs):
    size, mtime, ctime and inode stay; only the hash of the head sees the new content."""
    folder = _folder(tmp_path)
    target = folder / "records.csv"
    with target.open("r+b") as stream, mmap.mmap(stream.fileno(), 0) as mapped:
        mapped[6:7] = b"1"  # the same byte: the page is dirty now, its times moved now
        versions = _versions(folder)
        mapped[6:7] = b"7"  # value 1 -> 7, no write(2), no utime
        with pytest.raises(DataError) as caught:
            versions.check()
    assert "'records.csv'" in str(caught.value)
    assert "7" not in str(caught.value).replace("'", "")  # no values in the message

"""The reviewed bytes, and only those: a private read-only copy of an analysis for its child.

Why: the operator approves a SHA-256 over the analysis's code files (`flame hash`), but Python
imports more than those: a `.pyc` in `__pycache__` runs instead of its `.py`, a `.pth` or a
stray bytecode file can be imported by name. The node therefore copies exactly the hashed
files into a folder of its own, hashes the copy (so a file changed after `flame hash` but
before the copy is what gets checked against the approval), makes it read-only, and the
analysis child imports from there only, source only, with bytecode writing off. An analysis
folder holding bytecode, `__pycache__` or `.pth` files is refused, naming them: they are not
part of what was reviewed, and their presence there is a warning sign in itself.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flame.errors import AnalysisLoadError

__all__ = ["Snapshot", "take_snapshot", "unreviewed_importables"]

UNREVIEWED_SUFFIXES = (".pyc", ".pyo", ".pth", ".egg-link")
"""Files Python may import or execute that no hash covers."""
_LISTED = 10


def unreviewed_importables(path: str | Path) -> list[Path]:
    """Bytecode, `__pycache__` folders and `.pth` files in the analysis's folder (the folder
    `flame hash` walks; hidden folders, which neither the hash nor the snapshot include,
    are not looked at)."""
    path = Path(path)
    root = path.parent if path.is_file() else path
    found: list[Path] = []
    for current, folders, files in os.walk(root):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        here = Path(current)
        found += [here / f for f in folders if f == "__pycache__"]
        found += [here / f for f in sorted(files) if f.endswith(UNREVIEWED_SUFFIXES)]
    return found


def refuse_unreviewed(path: str | Path) -> None:
    """Refuse an analysis folder with importable files outside the hashed set, naming them."""
    found = unreviewed_importables(path)
    if not found:
        return
    root = Path(path).parent if Path(path).is_file() else Path(path)
    names = ", ".join(str(p.relative_to(root)) for p in found[:_LISTED])
    more = f" and {len(found) - _LISTED} more" if len(found) > _LISTED else ""
    raise AnalysisLoadError(
        f"analysis {path} holds files Python could run that no code hash covers: "
        f"{names}{more}; remove them (bytecode, __pycache__ folders, .pth files) and "
        "hash the folder again"
    )


@dataclass(frozen=True)
class Snapshot:
    """The private copy: `path` is what the child loads, `code` its SHA-256 (`flame hash`)."""

    path: Path
    root: Path
    code: str


def take_snapshot(path: str | Path) -> Snapshot:
    """Copy the hashed files of the analysis at `path` into a new read-only folder (removed
    at exit), refusing unreviewed importable files first."""
    from flame.analysis.code_hash import analysis_code_files, analysis_code_hash

    source = Path(path).resolve()
    refuse_unreviewed(source)
    origin = source.parent if source.is_file() else source
    files = analysis_code_files(source)
    root = Path(tempfile.mkdtemp(prefix="flame-code-"))
    atexit.register(_remove, root)
    try:
        for file in files:
            target = root.joinpath(*file.relative_to(origin).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_read_no_follow(file))
            target.chmod(0o444)
    except OSError as exc:
        _remove(root)
        raise AnalysisLoadError(f"cannot copy the analysis {path}: {exc}") from None
    for folder, _dirs, _files in os.walk(root, topdown=False):
        Path(folder).chmod(0o555)
    entry = root / source.name if source.is_file() else root
    return Snapshot(entry, root, analysis_code_hash(entry))


def _read_no_follow(file: Path) -> bytes:
    """The bytes of a regular file, never through a symlink swapped in after the check."""
    fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{file.name} is not a regular file")
        return stream.read()


def _remove(root: Path) -> None:
    with contextlib.suppress(OSError):
        for folder, _dirs, _files in os.walk(root):
            os.chmod(folder, stat.S_IRWXU)  # files are removable once their folder is writable
    shutil.rmtree(root, ignore_errors=True)

"""`flame check` items about the node's own installation: can the analysis be contained?

Why: the runtime imports its code from the installed files, next to the node's keys and
tokens. If the user the node runs as can write those files (a venv it owns, a root node),
anything running as that user, the analysis child included where its Landlock domain is
missing, can plant code the runtime will run. And without Landlock the child is not held to
its allow-list at all. Both are reported as FAIL, with how to fix them.
"""

from __future__ import annotations

import ctypes
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flame.ops.check_items import CheckItem

__all__ = ["import_path", "install_checks", "landlock_abi", "writable_code"]

_LISTED = 3
_MAX_ENTRIES = 500_000
_INSTALL_FIX = (
    "install flame for nodes as another user than the node's (e.g. as root into "
    "/opt/flame: python -m venv /opt/flame && /opt/flame/bin/pip install flame) and run the "
    "node as an unprivileged user that owns none of it"
)


def import_path() -> list[Path]:
    """Where the runtime imports from: flame's package, the stdlib, site-packages and every
    other entry of sys.path (PYTHONPATH, .pth folders); the working directory excluded."""
    roots = [Path(__file__).resolve().parents[1]]
    roots += [Path(p) for k, p in sysconfig.get_paths().items() if "lib" in k]
    roots += [Path(p) for p in sys.path[1:] if p]
    found: list[Path] = []
    for root in roots:
        real = root.resolve()
        if real.exists() and real not in found and real != Path(os.sep):
            found.append(real)
    return found


def _entries(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    yield root
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        for name in dirs:
            yield here / name
        for name in files:
            yield here / name


def writable_code(roots: list[Path]) -> tuple[list[Path], int]:
    """Files and folders under `roots` the current user may write (the first few), and how
    many there are (folders first: a writable folder takes a new module)."""
    found: list[Path] = []
    count = 0
    seen = 0
    for root in roots:
        for entry in _entries(root):
            seen += 1
            if seen > _MAX_ENTRIES:
                return found, count
            if not entry.is_symlink() and os.access(entry, os.W_OK):
                count += 1
                if len(found) < _LISTED:
                    found.append(entry)
    return found, count


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: unavailable, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    libc.syscall.restype = ctypes.c_long
    version = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(version), 0)


def install_checks(config: Any) -> list[CheckItem]:
    """The installation items of `flame check` for an analysis node (others: none)."""
    if getattr(config, "role", "analysis") != "analysis":
        return []
    items: list[CheckItem] = []
    roots = import_path()
    found, count = writable_code(roots)
    if count:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        listed = ", ".join(str(p) for p in found)
        items.append(
            CheckItem(
                "FAIL",
                "runtime code",
                detail=f"{count} installed file(s)/folder(s) the node user ({who}) can write, "
                f"e.g. {listed}",
                fix=_INSTALL_FIX,
            )
        )
    else:
        items.append(
            CheckItem("ok", "runtime code", detail=f"{len(roots)} import folder(s) read-only")
        )
    abi = landlock_abi()
    if abi < 1:
        items.append(
            CheckItem(
                "FAIL",
                "analysis sandbox",
                detail="Landlock is unavailable: the analysis child would not be held to its "
                "read/write allow-list",
                fix="run nodes on Linux >= 5.13 with Landlock enabled (lsm=landlock,...)",
            )
        )
    else:
        items.append(CheckItem("ok", "analysis sandbox", detail=f"Landlock ABI {abi}"))
    return items

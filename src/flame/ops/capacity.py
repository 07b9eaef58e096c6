"""Whether a results folder can take the run's writes: checked before a node joins.

Why: a results folder on a full disk passed the start-up check (it was writable), the run
computed for hours and lost its result at the final write. Free space alone can mislead
(quotas, reserved blocks), so the folder must also take a real reservation of that size
(`posix_fallocate` of a temporary file, removed at once).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["capacity_problem"]


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.0f} MiB"


def capacity_problem(folder: Path, needed: int) -> str | None:
    """Why `folder` (existing) cannot take `needed` more bytes now, or None."""
    if needed <= 0:
        return None
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        return f"cannot tell its free space ({exc.strerror})"
    if free < needed:
        return f"only {_mb(free)} free, the run needs {_mb(needed)}"
    try:
        handle, name = tempfile.mkstemp(prefix=".flame-space-", dir=folder)
    except OSError as exc:
        return f"cannot create a file in it ({exc.strerror})"
    try:
        reserve = getattr(os, "posix_fallocate", None)
        if reserve is not None:
            reserve(handle, 0, needed)
    except OSError as exc:
        if exc.errno in (95, 22):  # EOPNOTSUPP, EINVAL: the filesystem cannot reserve
            return None
        return f"it cannot take a write of {_mb(needed)} ({exc.strerror})"
    finally:
        os.close(handle)
        with contextlib.suppress(OSError):
            os.unlink(name)
    return None

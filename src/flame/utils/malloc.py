"""Fewer glibc malloc arenas while an in-process simulation runs one thread per node.

glibc gives each new thread its own arena (up to 8 per core) and an arena keeps the pages of
its peak: ten node threads each parsing a table left ten arenas holding ten peaks, 1.8x the
data's size above the interpreter for W1 (`benchmarks/simulate_scale.py --w1`), 0.6x with
arenas capped at the core count. Python's GIL lets few threads allocate at once, so the cap
costs no measurable time. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["cap_malloc_arenas"]

_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
_capped = False


def cap_malloc_arenas() -> bool:
    """Cap glibc's arenas at the usable cores (at least 2), once per process; True if set."""
    global _capped
    if _capped or not sys.platform.startswith("linux"):
        return _capped
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt arenas)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _capped = bool(mallopt(_M_ARENA_MAX, max(2, len(os.sched_getaffinity(0)))))
    return _capped

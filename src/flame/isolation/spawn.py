"""Starting analysis children, and starting them early ("warm") so they overlap our imports.

An analysis child is a fresh Python that imports numpy and flame's wire format before it can
take its first request: a few hundred milliseconds per node. `flame simulate` calls `prestart`
first thing, so the children import while the parent still imports and loads its config;
`ChildRunner.start` then takes a warm child instead of spawning one. A warm child knows
nothing yet (no analysis, no data, no node id): it gets all of that in its "load" request.
This module imports only the standard library, so calling it costs nothing up front.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

__all__ = ["prestart", "scrubbed_environment", "spawn_child", "take_warm"]

BOOT = Path(__file__).resolve().parent / "_boot.py"
ENV_KEEP = {
    "PATH",
    "HOME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONHASHSEED",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "SYSTEMROOT",
    "COVERAGE_PROCESS_START",
}
MAX_WARM = 32
_STOP_TIMEOUT = 5.0

_lock = threading.Lock()
_warm: list[tuple[subprocess.Popen[bytes], socket.socket, bool]] = []


def scrubbed_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: an allow-list of harmless variables, no FLAME_*, no tokens."""
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items() if k in ENV_KEEP or k.startswith("LC_")}


def spawn_child(
    cut_network: bool, capture_output: bool = False, *, hide: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """A new analysis child and our end of its socket (with `capture_output`, its stdout
    and stderr on one pipe for the caller to relay). `hide`: paths its Landlock domain
    makes unreachable (`_landlock`)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    command = [sys.executable, str(BOOT), str(theirs.fileno())]
    if not cut_network:
        command.append("--keep-network")
    for path in hide:
        command += ["--hide", path]
    try:
        process = subprocess.Popen(  # noqa: S603 (our own script, no shell)
            command,
            pass_fds=[theirs.fileno()],
            env=scrubbed_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_output else None,
            stderr=subprocess.STDOUT if capture_output else None,
            close_fds=True,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return process, ours


def prestart(count: int, *, cut_network: bool = True) -> None:
    """Start up to `count` children now (at most MAX_WARM waiting); unused ones are stopped
    at interpreter exit."""
    with _lock:
        want = max(0, min(count, MAX_WARM) - len(_warm))
    for _ in range(want):
        try:
            process, ours = spawn_child(cut_network)
        except OSError:
            return  # ChildRunner will spawn (and report) when it needs a child
        with _lock:
            _warm.append((process, ours, cut_network))


def take_warm(cut_network: bool) -> tuple[subprocess.Popen[bytes], socket.socket] | None:
    """A started child with this network setting that is still alive, if there is one."""
    with _lock:
        for i, (process, ours, cut) in enumerate(_warm):
            if cut == cut_network and process.poll() is None:
                del _warm[i]
                return process, ours
    return None


def _stop_unused() -> None:
    with _lock:
        unused = list(_warm)
        _warm.clear()
    for _, ours, _ in unused:  # a closed socket makes the child exit on its own
        with contextlib.suppress(OSError):
            ours.close()
    for process, _, _ in unused:
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=_STOP_TIMEOUT)


atexit.register(_stop_unused)

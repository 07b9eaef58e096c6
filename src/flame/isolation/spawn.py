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
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "ChildProcess",
    "empty_scratch",
    "prestart",
    "python_readable",
    "scratch_of",
    "scrubbed_environment",
    "spawn_child",
    "take_warm",
]

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
_readable_of: dict[int, frozenset[str]] = {}  # pid -> what its domain lets it read
_scratch_of: dict[int, str] = {}  # pid -> its private writable folder
_python_readable: dict[tuple[str, ...], tuple[str, ...]] = {}  # import path -> readable


def python_readable(*, with_script_dir: bool = False) -> list[str]:
    """What a child needs to read to run Python and flame: the interpreter's prefixes, the
    stdlib and site-packages, flame's own folder and this process's import path (without
    its first entry, the script's folder or the working directory, unless asked).
    Remembered per import path: a simulation asks once per node and epoch, and resolving
    every entry's symlinks costs a few hundred stat calls each time."""
    entries = tuple(sys.path if with_script_dir else sys.path[1:])
    with _lock:
        known = _python_readable.get(entries)
    if known is not None:
        return list(known)
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix]
    paths += [p for k, p in sysconfig.get_paths().items() if "lib" in k or k.endswith("stdlib")]
    paths.append(str(Path(__file__).resolve().parents[2]))  # the folder holding flame
    paths += [p for p in entries if p and os.path.exists(p)]
    seen: list[str] = []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen and real != os.sep:
            seen.append(real)
    with _lock:
        if len(_python_readable) >= 16:  # sys.path keeps changing: keep only recent ones
            _python_readable.clear()
        _python_readable[entries] = tuple(seen)
    return seen


class _HasPid(Protocol):
    pid: int


class ChildProcess(Protocol):
    """What the runner needs of a child: a `subprocess.Popen` or a fork server's child."""

    pid: int

    @property
    def returncode(self) -> int | Any: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


def scratch_of(process: _HasPid) -> str | None:
    """The private writable folder of a child we spawned."""
    with _lock:
        return _scratch_of.get(process.pid)


def empty_scratch(process: _HasPid) -> None:
    """Remove the child's scratch folder (after it exited: nothing it wrote survives)."""
    own = getattr(process, "scratch", None)  # a fork server's child carries its own
    if isinstance(own, str):
        shutil.rmtree(own, ignore_errors=True)
        return
    with _lock:
        scratch = _scratch_of.pop(process.pid, None)
        _readable_of.pop(process.pid, None)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


def scrubbed_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: an allow-list of harmless variables, no FLAME_*, no tokens."""
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items() if k in ENV_KEEP or k.startswith("LC_")}


def spawn_child(
    cut_network: bool,
    capture_output: bool = False,
    *,
    hide: Sequence[str] = (),
    read: Iterable[str] | None = None,
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """A new analysis child and our end of its socket. Its stdout and stderr are always
    pipes for the caller to relay (`output.relay_output`; `capture_output` is kept for
    callers and changes nothing here), its stdin /dev/null, and it leads a new session: it
    never holds the node's terminal or log descriptors (no TIOCSTI, no truncating the log),
    and a process group the runtime can kill. Its Landlock domain (`_landlock`) lets
    it read `read` (default: `python_readable()`) and write only a new private scratch
    folder (its TMPDIR and working directory, removed by `empty_scratch`); `hide`: paths
    carved out of those even where a readable folder holds them."""
    readable = python_readable() if read is None else list(read)
    scratch = tempfile.mkdtemp(prefix="flame-scratch-")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    command = [sys.executable, str(BOOT), str(theirs.fileno())]
    if not cut_network:
        command.append("--keep-network")
    for path in readable:
        command += ["--read", path]
    command += ["--write", scratch]
    for path in hide:
        command += ["--hide", path]
    env = scrubbed_environment()
    env.update(TMPDIR=scratch, PYTHONDONTWRITEBYTECODE="1")
    try:
        process = subprocess.Popen(  # noqa: S603 (our own script, no shell)
            command,
            pass_fds=[theirs.fileno()],
            env=env,
            cwd=scratch,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            start_new_session=True,
        )
    except BaseException:
        ours.close()
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        theirs.close()
    with _lock:
        _scratch_of[process.pid] = scratch
        _readable_of[process.pid] = frozenset(readable)
    return process, ours


def prestart(count: int, *, cut_network: bool = True, read: Iterable[str] = ()) -> None:
    """Start up to `count` children now (at most MAX_WARM waiting), able to read what
    Python needs and `read` (the analysis); unused ones are stopped at interpreter exit."""
    with _lock:
        want = max(0, min(count, MAX_WARM) - len(_warm))
    readable = python_readable(with_script_dir=True) + [os.path.realpath(p) for p in read]
    for _ in range(want):
        try:
            process, ours = spawn_child(cut_network, read=readable)
        except OSError:
            return  # ChildRunner will spawn (and report) when it needs a child
        with _lock:
            _warm.append((process, ours, cut_network))


def take_warm(
    cut_network: bool, read: Iterable[str] = ()
) -> tuple[subprocess.Popen[bytes], socket.socket] | None:
    """A started child with this network setting, able to read all of `read`, that is
    still alive, if there is one."""
    needed = {os.path.realpath(p) for p in read}
    with _lock:
        for i, (process, ours, cut) in enumerate(_warm):
            readable = _readable_of.get(process.pid, frozenset())
            covered = all(any(_within(n, r) for r in readable) for n in needed)
            if cut == cut_network and covered and process.poll() is None:
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
        empty_scratch(process)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


atexit.register(_stop_unused)

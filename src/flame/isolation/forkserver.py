"""The runtime's side of the fork server (`zygote`): start it once, ask it for children.

`flame simulate` (and `flame.simulate(isolate=True)`) run each node's `analyze` in a child
forked per call from one warmed, confined server instead of one cold interpreter per node;
at most `slots()` of those children compute at a time (one per core by default,
FLAME_SIMULATE_WORKERS to change it, 0 for one spawned child per node), so 100 or 1,000
nodes cost a few processes, not one each. The server is a fresh interpreter (`subprocess`,
`close_fds`, its own session): nothing of this process (a notebook kernel's sockets,
threads or atfork handlers) reaches it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from typing import IO

from flame.errors import FlameError
from flame.isolation.channel import Channel, ChannelClosed
from flame.isolation.spawn import BOOT, python_readable, scrubbed_environment

__all__ = [
    "ForkServer",
    "ForkedProcess",
    "prestart_server",
    "server_for",
    "slot",
    "slots",
    "supported",
]

_READY_TIMEOUT = 120.0
_STOP_TIMEOUT = 5.0
WORKERS_ENV = "FLAME_SIMULATE_WORKERS"


class ForkedProcess:
    """A child of the fork server, watched and stopped through its pidfd (it is not our
    child, so its exit code is unknown: `returncode` is -1 once it has exited)."""

    def __init__(self, pid: int, pidfd: int, scratch: str) -> None:
        self.pid = pid  # as the server sees it (it may run in its own PID namespace)
        self.scratch = scratch  # removed by `spawn.empty_scratch` once it has exited
        self._pidfd = pidfd
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self._pidfd >= 0:
            ready, _, _ = select.select([self._pidfd], [], [], 0)
            if ready:
                self._exited()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and self._pidfd >= 0:
            ready, _, _ = select.select([self._pidfd], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(f"forked child {self.pid}", timeout or 0.0)
            self._exited()
        return -1 if self.returncode is None else self.returncode

    def kill(self) -> None:
        if self.returncode is None and self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def _exited(self) -> None:
        self.returncode = -1
        fd, self._pidfd = self._pidfd, -1
        os.close(fd)

    def __del__(self) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)


class ForkServer:
    """One running `zygote`: confined to read `readable` (minus `hide`), write its pool
    folder, network cut unless asked; `fork()` gives a new child and our socket to it."""

    def __init__(
        self,
        cut_network: bool,
        readable: Sequence[str],
        hide: Sequence[str] = (),
        warm: Sequence[str] = (),
    ) -> None:
        self.cut_network = cut_network
        self.readable = frozenset(os.path.realpath(p) for p in readable)
        self.hide = tuple(hide)
        self.root = tempfile.mkdtemp(prefix="flame-pool-")
        self._lock = threading.Lock()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = [sys.executable, str(BOOT), str(theirs.fileno()), "--zygote"]
        if not cut_network:
            command.append("--keep-network")
        for path in sorted(self.readable):
            command += ["--read", path]
        command += ["--write", self.root]
        for path in self.hide:
            command += ["--hide", path]
        for name in warm:
            command += ["--warm", name]
        env = scrubbed_environment()
        env.update(TMPDIR=self.root, PYTHONDONTWRITEBYTECODE="1")
        try:
            self.process = subprocess.Popen(  # noqa: S603 (our own script, no shell)
                command,
                pass_fds=[theirs.fileno()],
                env=env,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                # never the caller's terminal or log descriptors (every child inherits them):
                # a pipe, relayed as log lines of flame.analysis
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                close_fds=True,
                start_new_session=True,  # no controlling terminal; Ctrl-C is the runtime's
            )
        except BaseException:
            ours.close()
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        finally:
            theirs.close()
        self._channel = Channel(ours, accept_descriptors=True)
        self._ready: dict[str, object] | None = None
        if self.process.stdout is not None:
            threading.Thread(target=_relay, args=(self.process.stdout,), daemon=True).start()

    def covers(self, cut_network: bool, readable: Iterable[str], hide: Sequence[str]) -> bool:
        """Whether this server's children can serve a runner with these settings."""
        needed = {os.path.realpath(p) for p in readable}
        inside = all(any(_within(n, r) for r in self.readable) for n in needed)
        return (
            cut_network == self.cut_network
            and tuple(hide) == self.hide
            and inside
            and self.process.poll() is None
        )

    def _await_ready(self) -> None:
        if self._ready is not None:
            return
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            try:
                op, body = self._channel.receive(timeout=1.0)
            except TimeoutError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise FlameError("the analysis fork server did not start") from None
                continue
            except (ChannelClosed, ConnectionError):
                raise FlameError("the analysis fork server exited while starting") from None
            if op == "ready" and isinstance(body, dict):
                self._ready = body
                return
            raise FlameError(f"unexpected {op!r} from the analysis fork server")

    def fork(self) -> tuple[ForkedProcess, socket.socket]:
        """A new child (its own scratch folder, registered for `empty_scratch`)."""
        scratch = tempfile.mkdtemp(prefix="flame-scratch-", dir=self.root)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                self._await_ready()
                self._channel.send("fork", {"scratch": scratch}, descriptors=[theirs.fileno()])
                op, body = self._channel.receive(timeout=60.0)
                passed, self._channel.passed = self._channel.passed, []
        except BaseException:
            ours.close()
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        finally:
            theirs.close()
        pid = body.get("pid") if isinstance(body, dict) else None
        if op != "forked" or len(passed) != 1 or not isinstance(pid, int):
            for fd in passed:
                os.close(fd)
            ours.close()
            shutil.rmtree(scratch, ignore_errors=True)
            raise FlameError(f"the analysis fork server refused to fork ({op!r})")
        return ForkedProcess(pid, passed[0], scratch), ours

    def stop(self) -> None:
        """Close our socket (the server exits; running children end with their channels)."""
        self._channel.close()
        if self._ready is None:  # still importing (a command that failed early): no wait
            self.process.kill()
        try:
            self.process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=_STOP_TIMEOUT)
        shutil.rmtree(self.root, ignore_errors=True)


_servers: list[ForkServer] = []
_servers_lock = threading.Lock()
_slots: threading.BoundedSemaphore | None = None
_chosen: dict[tuple[bool, tuple[str, ...], tuple[str, ...]], ForkServer] = {}


def server_for(
    cut_network: bool,
    readable: Iterable[str],
    hide: Sequence[str] = (),
    analysis: str | None = None,
) -> ForkServer:
    """A running fork server whose children may read `readable` (one is started if none
    is, warmed with what the `analysis` file imports): kept for the life of this process,
    so a notebook's next run starts warm."""
    needed = list(readable)
    key = (cut_network, tuple(needed), tuple(hide))
    with _servers_lock:
        known = _chosen.get(key)  # asked once per node and epoch: skip resolving paths
        if known is not None and known in _servers and known.process.poll() is None:
            return known
        for server in _servers:
            if server.covers(cut_network, needed, hide):
                _chosen[key] = server
                return server
        server = ForkServer(cut_network, needed, hide, warm_for(analysis))
        _servers.append(server)
        _chosen[key] = server
        return server


def prestart_server(
    read: Iterable[str] = (), *, cut_network: bool = True, analysis: str | None = None
) -> None:
    """Start a fork server now (it imports while the caller does), able to read what
    Python needs and `read` (the analysis folder)."""
    if not supported() or slots() == 0:
        return
    readable = python_readable(with_script_dir=True) + [os.path.realpath(p) for p in read]
    with contextlib.suppress(OSError):
        server_for(cut_network, readable, analysis=analysis)


def warm_for(analysis: str | None) -> list[str]:
    """What the server imports for this analysis besides `zygote.WARM_MODULES`: the
    installed packages it imports at its top (`top_imports`), and flame's secure fields
    where its files mention `secure` or `Results` (they import flame's settings and
    pydantic: 0.15 s and 15 MB the server would otherwise carry into every fork)."""
    return [*top_imports(analysis), *([SECURE_FIELDS] if _mentions_secure(analysis) else [])]


SECURE_FIELDS = "flame.secure.fields"
_SECURE_WORDS = re.compile(rb"\b(secure|Results)\b")


def _mentions_secure(analysis: str | None) -> bool:
    if not analysis:
        return False
    from pathlib import Path

    path = Path(analysis)
    files = sorted(path.glob("*.py")) if path.is_dir() else [path]
    for file in files[:200]:
        try:
            if _SECURE_WORDS.search(file.read_bytes()):
                return True
        except OSError:
            continue
    return False


def top_imports(analysis: str | None) -> list[str]:
    """The top-level packages the analysis file (or folder's `analysis.py`/`__init__.py`)
    imports absolutely, for the server to import before forking; [] when unreadable."""
    if not analysis:
        return []
    import ast
    from pathlib import Path

    path = Path(analysis)
    if path.is_dir():
        path = next((p for p in (path / "analysis.py", path / "__init__.py") if p.is_file()), path)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return []
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found = [node.module]
        else:
            continue
        for name in found:
            top = name.split(".")[0]
            if top.isidentifier() and top not in names and top != "flame" and _installed(top):
                names.append(top)
    return names[:20]


def _installed(name: str) -> bool:
    """Whether `name` is found in the stdlib or site-packages (not the analysis's own folder
    or another path: analysis code must never run in the server, whose memory every child
    inherits). Finding a top-level module runs none of its code."""
    import importlib.util
    import sysconfig

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    places = [spec.origin or "", *(spec.submodule_search_locations or [])]
    if spec.origin in ("built-in", "frozen"):
        return True
    roots = [
        os.path.realpath(p)
        for k, p in sysconfig.get_paths().items()
        if k in ("stdlib", "platstdlib", "purelib", "platlib")
    ]
    return all(
        p and any(_within(os.path.realpath(p), root) for root in roots) for p in places if p
    ) and any(places)


def supported() -> bool:
    """Whether this platform can run the fork server (Linux: fork, pidfd, descriptor passing)."""
    return (
        sys.platform.startswith("linux")
        and hasattr(os, "pidfd_open")
        and hasattr(signal, "pidfd_send_signal")
        and hasattr(socket, "send_fds")
    )


def slots() -> int:
    """How many pooled children may compute at once: FLAME_SIMULATE_WORKERS, else one per
    core this process may use; 0: no pool (one spawned child per node for the whole run,
    as on a production node)."""
    given = os.environ.get(WORKERS_ENV, "").strip()
    if given:
        try:
            count = int(given)
        except ValueError:
            raise FlameError(f"{WORKERS_ENV} must be a whole number, not {given[:20]!r}") from None
        if count < 0:
            raise FlameError(f"{WORKERS_ENV} must be 0 (no pool) or more")
        return count
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def slot() -> threading.BoundedSemaphore:
    """The process-wide semaphore of `slots()` computing children."""
    global _slots
    with _servers_lock:
        if _slots is None:
            _slots = threading.BoundedSemaphore(max(1, slots()))
        return _slots


def reset_slots() -> None:
    """Forget the semaphore (after FLAME_SIMULATE_WORKERS changed; tests)."""
    global _slots
    with _servers_lock:
        _slots = None


def _stop_all() -> None:
    with _servers_lock:
        servers = list(_servers)
        _servers.clear()
        _chosen.clear()
    for server in servers:
        with contextlib.suppress(OSError):
            server.stop()


def _relay(stream: IO[bytes]) -> None:
    """The children's prints and log lines, as lines of this process's log."""
    relay = logging.getLogger("flame.analysis")
    with contextlib.suppress(OSError, ValueError):
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            if line:
                relay.info("%s", line[:1000])


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


atexit.register(_stop_all)

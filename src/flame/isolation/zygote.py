"""The fork server's own loop: a confined, warmed Python that forks one analysis child per call.

Why: a cold analysis child costs a fresh interpreter plus numpy/pyarrow imports (~0.25 s CPU
and ~60 MB each); `flame simulate` with 100 nodes started 100 of them. This process is started
once (a fresh interpreter via `_boot.py --zygote`, never a fork of the caller, so a notebook
kernel's sockets and threads are not inherited), confines itself (user and network namespace,
Landlock: read the allow-list, write only its pool folder), imports what analyses use, and then
forks on request. Each fork closes the server's socket, enters a second Landlock layer that
writes only its own new scratch folder, and serves one node exactly as a spawned child does
(`flame.isolation.child.main`). It holds no node data, key or token: it only ever receives the
child's end of a socket pair. Imports the standard library and flame's channel only up front.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from types import ModuleType
from typing import Any

from flame.isolation.channel import Channel, ChannelClosed

__all__ = ["serve"]

WARM_MODULES = (
    "numpy",
    "numpy.random",
    "flame.isolation.child",
    "flame.analysis.functions",
    "flame.data",
    "flame.data.readers",
    "flame.data.sources.descriptor",
    "flame.node.context",
    "flame.privacy.markers",
    "flame.privacy.tracebacks",
    "flame.wire.envelope",
    "flame.wire.tables",
    "flame.data.columns",
    "flame.data.csv_columns",
    "flame.errors",
    "pyarrow",
    "pyarrow.compute",
    "pyarrow.csv",
)
"""Imported once here, before any fork: each node's child starts with them loaded (shared
copy-on-write pages), plus the libraries the analysis imports at its top (`--warm NAME`,
e.g. pandas; not by default: a bigger server forks slower; flame.secure.fields only for
an analysis that mentions it, `forkserver.warm_for`). The analysis itself is never
imported here (its folder is not on this path): every fork imports it afresh, so
module-level globals never carry from one node (or epoch) to the next."""


def _warm(extra: list[str]) -> None:
    import codecs
    import importlib

    for name in [*WARM_MODULES, *extra]:
        with contextlib.suppress(Exception):  # a library failing here fails in the child too
            importlib.import_module(name)
    codecs.lookup("utf-8-sig")  # what `Data.read_text` decodes with (a lookup imports it)


def _reap() -> None:
    """Collect exited children (the runtime watches each through its pidfd)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _options(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == name]


def _run_child(
    control: Channel, fd: int, scratch: str, landlock: ModuleType, argv: list[str], network: str
) -> int:
    """In the fork: forget the server, confine to `scratch`, serve one node's runtime."""
    control.close()
    os.chdir(scratch)
    os.environ["TMPDIR"] = scratch
    tempfile.tempdir = None  # recomputed from TMPDIR: this call's scratch, not the server's
    readable = [*_options(argv, "--read"), os.path.dirname(os.path.abspath(str(landlock.__file__)))]
    confinement = str(
        landlock.confine(
            readable,
            [scratch],
            _options(argv, "--hide"),
            cut_tcp="--keep-network" not in argv,
        )
    )
    numpy: Any = sys.modules.get("numpy")
    if numpy is not None:  # the legacy global generator was seeded once, in the server
        numpy.random.seed()
    from flame.isolation.child import main

    return main(fd, network, f"{confinement} (forked, layer 2)")


class _PidNamespaces:
    """Each fork as PID 1 of a PID namespace of its own: when it ends (or the runtime kills
    it), the kernel ends everything the analysis started, so nothing it forked outlives its
    call. The server asks for a new namespace before each fork (unshare) and goes back to
    its own for the next (setns): one process per node, not a waiter plus the node's init.
    Best effort: where a namespace is refused, the fork runs in the server's."""

    def __init__(self) -> None:
        import ctypes

        self._libc: Any = None
        self._own = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self._own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        self._libc = libc

    def enter(self) -> bool:
        """The next fork starts a new PID namespace (its PID 1); False where refused."""
        return self._libc is not None and self._libc.unshare(_CLONE_NEWPID) == 0

    def leave(self) -> None:
        """Forks after this one start in the server's own namespace again (else the next
        unshare is refused); without that, stop asking for namespaces."""
        if self._libc is not None and self._libc.setns(self._own, _CLONE_NEWPID) != 0:
            self._libc = None


_CLONE_NEWPID = 0x20000000


def serve(fd: int, network: str, confinement: str, landlock: ModuleType, argv: list[str]) -> int:
    """Fork a confined child for each "fork" request (body: its scratch folder; descriptor:
    its end of the runtime's socket) and answer with its pidfd; return when the runtime
    closes our socket."""
    import socket

    _warm(_options(argv, "--warm"))
    control = Channel(socket.socket(fileno=fd), accept_descriptors=True)
    import gc

    gc.collect()
    gc.freeze()  # the warm objects: never scanned by a child's collector, so never copied
    # the runtime may end at any point (e.g. a usage error while this server imported)
    with contextlib.suppress(ChannelClosed, ConnectionError):
        _loop(control, landlock, argv, network, confinement)
    return 0


def _loop(
    control: Channel, landlock: ModuleType, argv: list[str], network: str, confinement: str
) -> None:
    namespaces = _PidNamespaces()
    control.send("ready", {"pid": os.getpid(), "network": network, "confinement": confinement})
    while True:
        try:
            op, body = control.receive(timeout=1.0)
        except TimeoutError:
            _reap()
            continue
        except (ChannelClosed, ConnectionError):
            return
        passed, control.passed = control.passed, []
        scratch = body.get("scratch") if isinstance(body, dict) else None
        if op != "fork" or len(passed) != 1 or not isinstance(scratch, str):
            for extra in passed:
                os.close(extra)
            control.send("refused", {"reason": f"malformed request {op[:40]!r}"})
            continue
        child_fd = passed[0]
        sys.stdout.flush()
        sys.stderr.flush()
        entered = namespaces.enter()
        try:
            pid = os.fork()
        except BaseException:
            if entered:
                namespaces.leave()
            raise
        if pid != 0 and entered:
            namespaces.leave()
        if pid == 0:  # the node's child: never returns into this loop
            code = 1
            try:
                code = _run_child(control, child_fd, scratch, landlock, argv, network)
            except BaseException:  # reported on stderr; the runtime sees EOF
                import traceback

                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        os.close(child_fd)
        pidfd = os.pidfd_open(pid)  # not yet reaped (only _reap does): it is our child
        try:
            control.send("forked", {"pid": pid}, descriptors=[pidfd])
        finally:
            os.close(pidfd)
        _reap()

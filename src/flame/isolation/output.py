"""The analysis child's stdout and stderr, relayed as lines of the node's own log.

Why: a child that inherited the node's terminal or log file descriptors could type into the
operator's shell (TIOCSTI), truncate the node's log and write lines that look like the
node's own. The child gets pipes instead (`spawn.spawn_child`); this module reads them and
logs each line under the "flame.analysis" logger, marked as the analysis's output, with
control characters escaped (no terminal escape sequences), each line capped and the number
of lines per child bounded, so a chatty or hostile child can neither flood nor forge the log.
With the policy's `forward_logs`, those lines are forwarded like any other INFO line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
from typing import IO

__all__ = ["MAX_LINE", "MAX_LINES", "relay_output"]

MAX_LINE = 1000
MAX_LINES = 10_000  # per stream and child
_CHUNK = 64 * 1024

relay_log = logging.getLogger("flame.analysis")


def relay_output(process: subprocess.Popen[bytes], node_id: str = "") -> list[threading.Thread]:
    """Start relaying the child's stdout (INFO) and stderr (WARNING), stamped with the
    node's id (the relay thread has no node context of its own); the threads end at the
    child's EOF (its exit, or its last descriptor closed)."""
    threads = []
    for stream, level, label in (
        (process.stdout, logging.INFO, "analysis output"),
        (process.stderr, logging.WARNING, "analysis stderr"),
    ):
        if stream is None:
            continue
        thread = threading.Thread(
            target=_relay, args=(stream, level, label, node_id), name=f"flame-{label}", daemon=True
        )
        thread.start()
        threads.append(thread)
    return threads


def clean(raw: bytes) -> str:
    """One line as text with every non-printable character escaped (no ANSI sequences, no
    carriage returns that would overwrite what the terminal shows)."""
    text = raw.decode(errors="replace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _relay(stream: IO[bytes], level: int, label: str, node_id: str) -> None:
    extra = {"node_id": node_id} if node_id else None
    fd = stream.fileno()
    pending = b""
    skipping = False  # the rest of an over-long line is dropped up to its newline
    lines = dropped = 0

    def emit(raw: bytes) -> None:
        nonlocal lines, dropped
        line = clean(raw[:MAX_LINE]).rstrip()
        if not line:
            return
        if lines >= MAX_LINES:
            dropped += 1
            return
        lines += 1
        relay_log.log(level, "%s: %s", label, line[:MAX_LINE], extra=extra)

    with contextlib.suppress(OSError, ValueError):
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            pending += chunk
            while True:
                cut = pending.find(b"\n")
                if cut < 0:
                    if len(pending) > MAX_LINE:
                        if not skipping:
                            emit(pending)
                        skipping, pending = True, b""
                    break
                if not skipping:
                    emit(pending[:cut])
                skipping, pending = False, pending[cut + 1 :]
    if pending and not skipping:
        emit(pending)
    if dropped:
        relay_log.warning(
            "%s: %d further line(s) dropped (at most %d)", label, dropped, lines, extra=extra
        )
    with contextlib.suppress(OSError):
        stream.close()

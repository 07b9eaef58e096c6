"""SIGTERM handled like SIGINT: both stop a node through the same path (abort, reason, exit).

Python turns SIGINT into KeyboardInterrupt but lets SIGTERM kill the process silently, so a
container stopped with SIGTERM would leave the federation waiting for its epoch timeout.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from flame.errors import Stopped

__all__ = ["stop_on_sigterm"]


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises `Stopped` (a KeyboardInterrupt) in the main thread.

    Only the first SIGTERM raises: a second one during the goodbye (abort, status) must not cut
    it short. Outside the main thread, or when someone else installed a handler, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        yield
        return
    raised = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if raised:
            return
        raised = True
        raise Stopped("SIGTERM", 128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

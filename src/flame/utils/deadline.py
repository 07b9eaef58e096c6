"""Monotonic deadlines: every wait in flame has one."""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from collections.abc import Iterator


class Deadline:
    """A point in time `seconds` from now; `left()` never goes below zero."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        return max(self._end - time.monotonic(), 0.0)

    def passed(self) -> bool:
        return time.monotonic() >= self._end


_call_end: contextvars.ContextVar[float] = contextvars.ContextVar(
    "flame_call_end", default=math.inf
)


@contextlib.contextmanager
def call_deadline(end: float) -> Iterator[None]:
    """Bound the data-source calls made inside to the monotonic time `end`.

    The node runtime serves an isolated analysis's source calls in its own thread: a slow
    query or a trickling API would otherwise hold the node past its epoch's deadline (SQL,
    HTTP and FHIR sources cap their waits at `call_left`)."""
    token = _call_end.set(min(end, _call_end.get()))
    try:
        yield
    finally:
        _call_end.reset(token)


def call_left(limit: float = math.inf) -> float:
    """`limit` seconds, or what is left of the current `call_deadline` when that is less."""
    return max(0.0, min(limit, _call_end.get() - time.monotonic()))

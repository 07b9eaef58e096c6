"""Monotonic deadlines: every wait in flame has one."""

from __future__ import annotations

import time


class Deadline:
    """A point in time `seconds` from now; `left()` never goes below zero."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        return max(self._end - time.monotonic(), 0.0)

    def passed(self) -> bool:
        return time.monotonic() >= self._end

"""Shifts this process's wall clock by TEST_CLOCK_SHIFT seconds (e.g. -600: ten minutes
back), as a VM restored from a snapshot or an NTP step would. Imported at start-up by any
Python process that has this folder on its PYTHONPATH (see `shifted_clock_env`); monotonic
clocks are left alone, as they are on a real machine."""

from __future__ import annotations

import os
import time

_SHIFT = float(os.environ.get("TEST_CLOCK_SHIFT", "0") or 0)

if _SHIFT:
    _real_time, _real_time_ns = time.time, time.time_ns

    def _time() -> float:
        return _real_time() + _SHIFT

    def _time_ns() -> int:
        return _real_time_ns() + int(_SHIFT * 1e9)

    time.time = _time
    time.time_ns = _time_ns

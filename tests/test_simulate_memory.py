"""What keeps an in-process simulation's memory near the data's size (issue 23, W1): table
parses bounded by the cores, and glibc's malloc arenas capped (benchmarks/simulate_scale.py
--w1 measures the peak; these tests check the two mechanisms are in force)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import flame
from flame.data import handle


def test_concurrent_table_parses_are_bounded_by_the_cores(monkeypatch) -> None:
    inside, most = 0, 0
    lock = threading.Lock()
    original = handle.Data._read_csv

    def counting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.05)  # long enough for every thread to arrive if nothing held them
        try:
            return original(self, *args, **kwargs)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(handle.Data, "_read_csv", counting)
    data = {f"n{i}": {"x.csv": f"v\n{i}\n"} for i in range(12)}

    def analyze(data):  # type: ignore[no-untyped-def]
        return {"v": float(data.read_csv()["v"][0])}

    result = flame.simulate(analyze, lambda r: sum(x["v"] for x in r.values()), data=data)
    assert result.value == sum(range(12))
    assert 1 <= most <= max(2, len(os.sched_getaffinity(0)))


def test_an_analysis_blocked_on_messages_does_not_hold_a_parse_slot() -> None:
    """Only the parse is bounded: twelve nodes that each wait for the others inside
    analyze (a message round) still finish."""
    data = {f"n{i}": {"x.csv": f"v\n{i}\n"} for i in range(12)}

    def analyze(data):  # type: ignore[no-untyped-def]
        ctx = flame.context()
        value = float(data.read_csv()["v"][0])
        others = [p for p in ctx.participants if p != ctx.node_id]
        ctx.send("round", {"v": value})  # default: the other analysis nodes
        got = ctx.receive("round", timeout=60)  # default: the same nodes
        assert sorted(got.messages) == sorted(others) and not got.missing
        return {"v": value}

    result = flame.simulate(analyze, lambda r: sum(x["v"] for x in r.values()), data=data)
    assert result.value == sum(range(12))


def test_in_process_simulate_caps_the_malloc_arenas() -> None:
    script = (
        "import flame\n"
        "from flame.utils import malloc\n"
        "assert not malloc._capped\n"
        "data = {'a': {'x': '1'}, 'b': {'x': '2'}}\n"
        "flame.simulate(lambda d: {'n': 1}, lambda r: len(r), data=data)\n"
        "print('capped', malloc._capped)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    glibc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else ""
    assert ("capped True" in done.stdout) == bool(glibc and glibc.startswith("glibc"))

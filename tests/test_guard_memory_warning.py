"""The warning that a key holder's differencing guard lives in memory only: said where a
restart could forget the guard (`flame run` without node storage), not in a simulation, whose
throwaway keys and state end with the process."""

from __future__ import annotations

import logging

import pytest

import flame
from flame.aggregator.run_store import MemoryState
from flame.secure.guard import GuardLedger

WARNING = "kept in memory only"


def _ledger(state: MemoryState) -> GuardLedger:
    return GuardLedger.for_secret("a", 12345, state, "flame-test-guard")


def test_a_node_without_storage_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flame.secure.guard"):
        assert _ledger(MemoryState()).fixed("run", "x") is None
    assert WARNING in caplog.text


def test_a_simulated_node_is_not_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flame.secure.guard"):
        assert _ledger(MemoryState(whole_run_here=True)).fixed("run", "x") is None
    assert WARNING not in caplog.text


def test_a_secure_simulation_prints_no_storage_warning(caplog: pytest.LogCaptureFixture) -> None:
    def analyze(data):  # type: ignore[no-untyped-def]
        return {"s": flame.secure(float(data.read_text("x")))}

    with caplog.at_level(logging.WARNING):
        result = flame.simulate(
            analyze,
            lambda r: float(r.secure["s"]),
            data={"a": {"x": "1"}, "b": {"x": "2"}, "c": {"x": "4"}},
            secure=True,
        )
    assert result.value == 7.0
    assert WARNING not in caplog.text

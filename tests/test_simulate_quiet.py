"""A successful simulation says nothing alarming at its end.

A node that finished normally leaves the run with a goodbye status (`done`, online false):
that is no reason for a warning per node (100 nodes printed 100 "went offline" lines at the
end of every successful `flame simulate`). A node that vanishes mid-run (its last will,
state `offline`) still warns.
"""

from __future__ import annotations

import logging
import os

import pytest

import flame
from flame.data import Data

NODES = ["a", "b", "c", "d"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("FLAME_"):
            monkeypatch.delenv(name)


def _data() -> dict[str, dict[str, str]]:
    return {node: {"x.csv": f"v\n{i}\n"} for i, node in enumerate(NODES)}


def _count(data: Data) -> int:
    return len(list(data.rows("x.csv")))


def test_a_successful_run_warns_of_no_node_going_offline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="flame"):
        result = flame.simulate(_count, lambda results: sum(results.values()), data=_data())
    assert result.value == len(NODES)
    offline = [r.getMessage() for r in caplog.records if "went offline" in r.getMessage()]
    assert offline == []



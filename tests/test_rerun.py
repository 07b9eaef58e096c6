"""Starting an analysis id again: a finished run announces its stored result instead of
recomputing, and stored checkpoints or results of different analysis code are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

import flame
from flame.analysis.loader import load_analysis
from flame.config import load_config

NODES = {"a": {"x.csv": "v\n1\n2\n"}, "b": {"x.csv": "v\n5\n"}}

ANALYSIS = """
import os
CALLS = os.environ.get("FLAME_TEST_CALLS")

def analyze(data, epoch, previous):
    if CALLS:
        with open(CALLS, "a") as log:
            log.write(data.node_id + "\\n")
    return float(data.read_csv()["v"].sum()) * {factor}

def aggregate(results, epoch, previous):
    return sum(results.values())
"""


def write(folder: Path, factor: int) -> flame.analysis.functions.AnalysisFunctions:
    folder.mkdir()
    (folder / "analysis.py").write_text(ANALYSIS.format(factor=factor))
    return load_analysis(folder).functions


def test_a_finished_analysis_announces_its_stored_result(tmp_path, monkeypatch) -> None:
    calls = tmp_path / "calls.log"
    monkeypatch.setenv("FLAME_TEST_CALLS", str(calls))
    functions = write(tmp_path / "one", factor=2)
    config = load_config(analysis_id="rerun", epochs=2, storage={"results_dir": tmp_path / "r"})
    first = flame.simulate(functions.analyze, functions.aggregate, data=NODES, config=config)
    computed = calls.read_text().splitlines()
    assert len(computed) == 4  # two nodes, two epochs
    again = flame.simulate(functions.analyze, functions.aggregate, data=NODES, config=config)
    assert again.value == first.value == 16.0
    assert calls.read_text().splitlines() == computed  # nothing was recomputed
    assert [r.epoch for r in again.history] == [0, 1]


def test_different_code_under_the_same_analysis_id_is_refused(tmp_path) -> None:
    config = load_config(analysis_id="rerun", epochs=1, storage={"results_dir": tmp_path / "r"})
    one = write(tmp_path / "one", factor=2)
    flame.simulate(one.analyze, one.aggregate, data=NODES, config=config)
    other = write(tmp_path / "other", factor=3)
    with pytest.raises(flame.ConfigError, match="different analysis code; use a new analysis id"):
        flame.simulate(other.analyze, other.aggregate, data=NODES, config=config)

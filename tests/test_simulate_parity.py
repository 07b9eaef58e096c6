"""`flame simulate` and `flame.simulate` can do the same things (issue 23, item 3).

The CLI's options are read from its argument parser and the Python parameters from the
function's signature, so a new option on either side without a counterpart fails here.
Tables keep their index in the CLI's stdout and `--output` JSON as they do in Python.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import flame
from flame.cli.app import _parser

# CLI option (argparse dest) -> the `flame.simulate` parameter(s) doing the same, or, where
# Python does it another way, that way in words (starting with "not a parameter:").
CLI_TO_PYTHON: dict[str, tuple[str, ...] | str] = {
    "analysis": ("analyze", "aggregate", "converged"),
    "data": ("data",),
    "nodes": ("nodes",),
    "param": ("params",),
    "epochs": ("epochs",),
    "seed": ("seed",),
    "timeout": ("config",),  # config=load_config(epoch_timeout=...)
    "output": ("output",),
    "secure": ("secure",),
    "broker": ("broker",),  # a MemoryBroker, or a factory such as mqtt_transport_factory
    "policy": ("policy",),
    "aggregator_policy": ("aggregator_policy",),
    "in_process": ("isolate",),
    "quiet": ("on_event",),  # the progress lines are what on_event receives
    "verbose": "not a parameter: logging.getLogger('flame').setLevel(logging.DEBUG)",
}
# `flame.simulate` parameter -> the CLI option(s) doing the same, or the setting in words.
PYTHON_TO_CLI: dict[str, tuple[str, ...] | str] = {
    "analyze": ("analysis",),
    "aggregate": ("analysis",),
    "converged": ("analysis",),
    "data": ("data",),
    "nodes": ("nodes",),
    "params": ("param",),
    "epochs": ("epochs",),
    "seed": ("seed",),
    "config": "not an option: every FLAME_* variable applies to the CLI (and --timeout)",
    "broker": ("broker",),
    "on_event": ("quiet",),
    "store": "not an option: FLAME_STORAGE__* (the run store the CLI opens)",
    "secure": ("secure",),
    "isolate": ("in_process",),
    "policy": ("policy",),
    "output": ("output",),
    "aggregator_policy": ("aggregator_policy",),
}


def _simulate_options() -> set[str]:
    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    simulate = commands.choices["simulate"]
    return {a.dest for a in simulate._actions if not isinstance(a, argparse._HelpAction)}


def test_every_cli_option_has_a_python_counterpart_and_the_reverse() -> None:
    options = _simulate_options()
    parameters = set(inspect.signature(flame.simulate).parameters)
    assert options == set(CLI_TO_PYTHON), "map the new flame simulate option to flame.simulate"
    assert parameters == set(PYTHON_TO_CLI), "map the new flame.simulate parameter to the CLI"
    for option, python in CLI_TO_PYTHON.items():
        if isinstance(python, str):
            assert python.startswith("not a parameter:"), option
        else:
            assert set(python) <= parameters, option
    for parameter, cli in PYTHON_TO_CLI.items():
        if isinstance(cli, str):
            assert cli.startswith("not an option:"), parameter
        else:
            assert set(cli) <= options, parameter


ANALYSIS = """\
import flame
import pandas as pd

def analyze(data):
    rows = list(data.rows("x.csv"))
    frame = pd.DataFrame({"diagnosis": [r["dx"] for r in rows]})
    counts = frame["diagnosis"].value_counts().sort_index()
    return {"counts": counts.to_dict(), "scale": flame.context().params["scale"]}

def aggregate(results):
    total = {}
    for r in results.values():
        for k, v in r["counts"].items():
            total[k] = total.get(k, 0) + v * r["scale"]
    table = pd.DataFrame({"n": total}).rename_axis("diagnosis").sort_index()
    return {"table": table, "series": table["n"]}
"""


@pytest.fixture
def federation(tmp_path: Path) -> Path:
    pytest.importorskip("pandas")
    (tmp_path / "analysis.py").write_text(ANALYSIS)
    for node, rows in (("a", ["flu", "cold", "flu"]), ("b", ["cold", "asthma"])):
        folder = tmp_path / "data" / node
        folder.mkdir(parents=True)
        (folder / "x.csv").write_text("dx\n" + "\n".join(rows) + "\n")
    (tmp_path / "nodes.toml").write_text(
        '[nodes.a]\ndata = "data/a"\n\n[nodes.b]\ndata = "data/b"\n'
    )
    return tmp_path


EXPECTED = {"diagnosis": ["asthma", "cold", "flu"], "n": [2, 4, 4]}


def test_python_takes_params_and_a_nodes_file_like_the_cli(federation: Path) -> None:
    sys.modules.pop("analysis", None)  # another test's module of that name, if any
    sys.path.insert(0, str(federation))
    try:
        import analysis  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(federation))
    out = federation / "run.json"
    result = flame.simulate(
        analysis.analyze,
        analysis.aggregate,
        nodes=federation / "nodes.toml",
        params={"scale": 2},
        output=out,
    )
    assert list(result.value["table"].index) == EXPECTED["diagnosis"]
    assert result.value["table"]["n"].tolist() == EXPECTED["n"]
    document = json.loads(out.read_text())
    assert document["result"]["table"] == EXPECTED
    assert document["result"]["series"] == EXPECTED
    assert document["manifest"]["participants"] == ["a", "b"]
    with pytest.raises(flame.FlameError, match="either data= or nodes="):
        flame.simulate(analysis.analyze, analysis.aggregate)


def test_cli_output_keeps_the_tables_index(federation: Path) -> None:
    out = federation / "cli.json"
    done = subprocess.run(
        [sys.executable, "-m", "flame", "simulate", federation / "analysis.py",
         "--nodes", federation / "nodes.toml", "--param", "scale=2", "--quiet",
         "--output", out],
        capture_output=True, text=True, timeout=180, cwd=federation,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["table"] == EXPECTED and printed["series"] == EXPECTED
    assert json.loads(out.read_text())["result"]["table"] == EXPECTED


def test_a_default_index_is_left_out() -> None:
    pd = pytest.importorskip("pandas")
    from flame.wire.envelope import to_jsonable

    assert to_jsonable(pd.DataFrame({"x": [1, 2]})) == {"x": [1, 2]}
    assert to_jsonable(pd.Series([1, 2], name="x")) == {"x": [1, 2]}
    labelled = pd.Series([1, 2], index=pd.Index(["p", "q"], name="k"), name="x")
    assert to_jsonable(labelled) == {"k": ["p", "q"], "x": [1, 2]}
    same = pd.Series([5], index=pd.Index(["p"], name="v"), name="v")
    assert to_jsonable(same) == {"v": ["p"], "value": [5]}

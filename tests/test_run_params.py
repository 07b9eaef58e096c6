"""Run parameters reach flame.context().params on every node; honest warnings at the end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from pydantic import BaseModel

import flame
from flame.aggregator.honesty import non_finite_fields
from flame.cli import main
from flame.config import load_config

DATA = {"a": {"x.csv": "v\n1\n"}, "b": {"x.csv": "v\n2\n"}}


def test_params_from_config_reach_analyze_and_aggregate() -> None:
    class Params(BaseModel):
        column: str
        bins: int

    def analyze(data: flame.Data) -> dict[str, object]:
        typed = flame.context().params_as(Params)
        return {"column": typed.column, "bins": typed.bins}

    def aggregate(results: dict[str, dict[str, object]]) -> dict[str, object]:
        return {"nodes": results, "params": flame.context().params}

    config = load_config(params={"column": "age", "bins": "10"})
    result = flame.simulate(analyze, aggregate, data=DATA, config=config)
    assert result.value["nodes"] == {n: {"column": "age", "bins": 10} for n in ("a", "b")}
    assert result.value["params"] == {"column": "age", "bins": "10"}


def test_flame_params_env_and_cli_param_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "analysis.py").write_text(
        "import flame\n"
        "def analyze(data):\n"
        "    return dict(flame.context().params)\n"
        "def aggregate(results):\n"
        "    return next(iter(results.values()))\n"
    )
    for node, value in (("n1", 1), ("n2", 2)):
        (tmp_path / "data" / node).mkdir(parents=True)
        (tmp_path / "data" / node / "x.csv").write_text(f"v\n{value}\n")
    monkeypatch.setenv("FLAME_PARAMS", json.dumps({"column": "weight", "keep": True}))
    code = main(
        ["simulate", str(tmp_path / "analysis.py"), "--data", str(tmp_path / "data"),
         "--param", "column=age", "--param", "bins=10", "--param", "cut=[1, 2.5]", "--quiet"]
    )  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out) == {"column": "age", "keep": True, "bins": 10, "cut": [1, 2.5]}
    assert main(["simulate", str(tmp_path / "analysis.py"), "--data", "x", "--param", "oops"]) == 2
    assert "--param 'oops': expected KEY=VALUE" in capsys.readouterr().err


def test_epoch_limit_without_convergence_warns(caplog: pytest.LogCaptureFixture) -> None:
    def analyze(data: flame.Data, epoch: int) -> int:
        return epoch

    def aggregate(results: dict[str, int]) -> float:
        return float("nan")

    def converged(current: object, previous: object) -> bool:
        return False

    with caplog.at_level(logging.WARNING):
        result = flame.simulate(analyze, aggregate, converged, data=DATA, epochs=2)
    assert result.converged is False and result.epochs == 2
    text = caplog.text
    assert "epoch limit of 2 epoch(s) without converging" in text
    assert '"converged": false' in text
    assert "NaN or infinite values: result (nan)" in text


def test_converged_or_no_criterion_stays_quiet(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        flame.simulate(lambda data: 1, lambda results: {"mean": 1.0}, data=DATA)
        flame.simulate(lambda data: 1, lambda r: 2, lambda current: True, data=DATA, epochs=5)
    assert "epoch limit" not in caplog.text and "NaN" not in caplog.text


def test_non_finite_fields_are_named() -> None:
    import numpy as np

    value = {"age": {"mean": float("nan"), "n": 3}, "coef": np.array([1.0, np.inf]), "ok": [1.0]}
    assert list(non_finite_fields(value)) == [
        "result.age.mean (nan)",
        "result.coef[1] (1 of 2 not finite)",
    ]


def test_params_are_recorded_in_the_manifest(tmp_path: Path) -> None:
    config = load_config(
        params={"column": "age", "bins": 10},
        storage={"results_dir": str(tmp_path / "results")},
        analysis_id="params-manifest",
    )
    flame.simulate(lambda data: 1, lambda results: 2, data=DATA, config=config)
    (manifest,) = (tmp_path / "results").rglob("manifest.json")
    recorded = json.loads(manifest.read_text())
    assert recorded["params"] == {"column": "age", "bins": 10}
    assert recorded["config"]["params"] == {"column": "age", "bins": 10}

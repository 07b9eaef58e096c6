"""Central DP at the aggregator: `aggregate` returns flame.dp markers, the aggregator runtime
charges its own ledger, then draws the noise once; a budget that does not fit, a forged
marker or a missing budget refuses the release, and the exact value is found nowhere.

The noise comes from OpenDP's CSPRNG (unseedable), so its distribution is tested with a fixed
sample size and a Kolmogorov-Smirnov bound at significance 1e-5, as tests/test_dp.py does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flame
from flame.dp import Noise, gaussian_sigma
from flame.errors import ConfigError, RunFailed
from flame.privacy.central import AggregatorPolicy, CentralDP, load_aggregator_policy

N = 20_000
KS_CRITICAL = math.sqrt(-math.log(1e-5 / 2) / 2) / math.sqrt(N)
EXACT = 7777.123456789  # the pooled total: a value no noisy release prints by chance
EXACT_TEXT = "7777.12345"


def ks_distance(sample: np.ndarray, cdf: Any) -> float:
    x = np.sort(sample)
    f = cdf(x)
    above = np.arange(1, x.size + 1) / x.size - f
    below = f - np.arange(0, x.size) / x.size
    return float(max(above.max(), below.max()))


def central(folder: Path, epsilon: float = 1.0, delta: float = 0.0) -> CentralDP:
    policy = AggregatorPolicy(epsilon_budget=epsilon, delta_budget=delta, ledger_dir=folder)
    return CentralDP(policy, node_id="aggregator", analysis_id="study")


def entries(folder: Path) -> list[dict[str, Any]]:
    path = folder / "aggregator--aggregate.json"
    return json.loads(path.read_text())["entries"] if path.exists() else []


# --- the release -------------------------------------------------------------------------------


def test_one_release_charges_the_epochs_exact_spend_once(tmp_path: Path) -> None:
    dp = central(tmp_path, epsilon=1.0, delta=1e-5)
    value = {
        "total": flame.dp.laplace(EXACT, sensitivity=1.0, epsilon=0.3),
        "nested": [1, (2, flame.dp.gaussian(np.zeros(3), 1.0, 0.2, 1e-6))],
        "n": 3,
    }
    released, report = dp.release(value, epoch=4)
    assert report is not None
    assert report.fields == ["total", "nested[1][1]"]
    [entry] = entries(tmp_path)
    assert (entry["analysis"], entry["epoch"]) == ("study", 4)
    assert entry["epsilon"] == pytest.approx(0.5, abs=1e-15)
    assert entry["delta"] == pytest.approx(1e-6, abs=1e-21)
    assert report.total_spent is not None and report.total_spent.epsilon == entry["epsilon"]
    assert released["n"] == 3 and released["nested"][0] == 1
    assert isinstance(released["nested"][1], tuple) and released["nested"][1][0] == 2
    assert released["total"] != EXACT and isinstance(released["total"], float)
    assert released["nested"][1][1].shape == (3,) and np.all(released["nested"][1][1] != 0)
    assert not any(isinstance(v, Noise) for v in (released["total"], released["nested"][1][1]))


def test_an_aggregate_without_markers_is_untouched_and_spends_nothing(tmp_path: Path) -> None:
    value = {"total": EXACT, "rows": [1, 2]}
    released, report = central(tmp_path).release(value, 0)
    assert released is value and report is None and entries(tmp_path) == []
    no_budget = CentralDP(None, node_id="aggregator", analysis_id="study")
    assert no_budget.release(value, 0) == (value, None)


def test_laplace_noise_at_the_aggregator_has_scale_sensitivity_over_epsilon(
    tmp_path: Path,
) -> None:
    released, _ = central(tmp_path).release(flame.dp.laplace(np.zeros(N), 2.0, 0.5), 0)
    noise = np.asarray(released)

    def cdf(scale: float) -> Any:
        return lambda x: np.where(x < 0, 0.5 * np.exp(x / scale), 1 - 0.5 * np.exp(-x / scale))

    assert ks_distance(noise, cdf(4.0)) < KS_CRITICAL
    assert ks_distance(noise, cdf(5.0)) > KS_CRITICAL  # a wrong scale is told apart
    assert ks_distance(noise, cdf(3.2)) > KS_CRITICAL


def test_gaussian_noise_at_the_aggregator_has_opendps_sigma(tmp_path: Path) -> None:
    dp = central(tmp_path, epsilon=1.0, delta=1e-5)
    released, _ = dp.release(flame.dp.gaussian(np.full(N, 10.0), 1.0, 1.0, 1e-5), 0)
    sigma = gaussian_sigma(1.0, 1.0, 1e-5)
    erf = np.vectorize(math.erf)
    noise = np.asarray(released) - 10.0
    assert ks_distance(noise, lambda x: 0.5 * (1 + erf(x / (sigma * math.sqrt(2))))) < KS_CRITICAL
    wrong = 1.25 * sigma
    assert ks_distance(noise, lambda x: 0.5 * (1 + erf(x / (wrong * math.sqrt(2))))) > KS_CRITICAL


def test_a_budget_that_would_be_exceeded_refuses_and_records_nothing(tmp_path: Path) -> None:
    dp = central(tmp_path, epsilon=1.0)
    dp.release({"total": flame.dp.laplace(EXACT, 1.0, 0.6)}, 0)
    with pytest.raises(RunFailed) as refused:
        # two fields: together over the budget, though each alone would fit
        dp.release({"a": flame.dp.laplace(EXACT, 1.0, 0.3), "b": flame.dp.laplace(1.0, 1, 0.3)}, 1)
    text = str(refused.value)
    assert "epsilon_budget" in text and "aggregator--aggregate.json" in text
    assert "FLAME_POLICY on the aggregation node" in text
    assert EXACT_TEXT not in text and refused.value.epoch == 1
    assert [e["epoch"] for e in entries(tmp_path)] == [0]  # the refused spend is not recorded


@pytest.mark.parametrize(
    "marker",
    [
        Noise(EXACT, "laplace", -1.0, -1.0),  # negative: a positive scale, a negative charge
        Noise(EXACT, "laplace", 1.0, 0.0),
        Noise(EXACT, "laplace", 1.0, float("inf")),
        Noise(EXACT, "laplace", 1.0, 0.5, delta=0.1),
        Noise(EXACT, "gaussian", 1.0, 0.5, delta=0.0),
        Noise(EXACT, "none", 1.0, 0.5),
        Noise(EXACT, "laplace", True, 0.5),  # type: ignore[arg-type]
        Noise(EXACT, "gaussian", 1.0, 0.5, 1e-6, contributors=4),
        Noise(float("nan"), "laplace", 1.0, 0.5),
        Noise("7777", "laplace", 1.0, 0.5),
        Noise({"x": EXACT}, "laplace", 1.0, 0.5),
    ],
    ids=[
        "negative",
        "zero-epsilon",
        "infinite-epsilon",
        "laplace-delta",
        "gaussian-no-delta",
        "mechanism",
        "bool-sensitivity",
        "contributors",
        "nan",
        "text",
        "dict",
    ],
)
def test_a_forged_marker_is_refused_before_anything_is_charged(
    tmp_path: Path, marker: Noise
) -> None:
    value = {"fine": flame.dp.laplace(1.0, 1.0, 0.1), "forged": marker}
    with pytest.raises(RunFailed) as refused:
        central(tmp_path).release(value, 0)
    assert "'forged'" in str(refused.value) and EXACT_TEXT not in str(refused.value)
    assert entries(tmp_path) == []


def test_markers_the_aggregator_cannot_release_are_refused(tmp_path: Path) -> None:
    hidden = np.array([flame.dp.laplace(EXACT, 1.0, 0.5)], dtype=object)
    with pytest.raises(RunFailed, match="inside an array"):
        central(tmp_path).release({"cells": hidden}, 0)
    with pytest.raises(RunFailed, match="aggregator has no data"):
        central(tmp_path).release({"s": flame.dp.sum("age", epsilon=0.5)}, 0)
    assert entries(tmp_path) == []


def test_without_a_budget_a_marker_is_refused_naming_the_setting(tmp_path: Path) -> None:
    dp = CentralDP(None, node_id="aggregator", analysis_id="study", where="--aggregator-policy")
    with pytest.raises(RunFailed) as refused:
        dp.release({"total": flame.dp.laplace(EXACT, 1.0, 0.5)}, 2)
    text = str(refused.value)
    assert "epsilon_budget" in text and "--aggregator-policy" in text and "'total'" in text
    assert EXACT_TEXT not in text


# --- the aggregator's policy file --------------------------------------------------------------


def test_the_aggregator_policy_file_shares_a_nodes_file_but_refuses_typos(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = tmp_path / "policy.toml"
    shared.write_text('epsilon_budget = 2.0\nmin_cell_count = 5\nledger_dir = "spent"\n')
    with caplog.at_level(logging.WARNING, logger="flame.privacy.policy"):
        policy = load_aggregator_policy(shared)
    assert policy.epsilon_budget == 2.0 and policy.ledger_dir == tmp_path / "spent"
    assert "min_cell_count" in caplog.text and "ignored" in caplog.text
    default = tmp_path / "bare.toml"
    default.write_text("epsilon_budget = 1.0\n")
    assert load_aggregator_policy(default).ledger_dir == tmp_path / ".flame-ledger"
    typo = tmp_path / "typo.toml"
    typo.write_text("epsilon_budgte = 1.0\n")
    with pytest.raises(ConfigError, match=r"not an aggregator policy setting.*epsilon_budget"):
        load_aggregator_policy(typo)
    assert load_aggregator_policy(None).epsilon_budget is None


# --- whole runs ----------------------------------------------------------------------------

ANALYSIS = textwrap.dedent(
    """
    import flame

    def analyze(data, epoch, previous):
        values = [float(v) for v in data.read_text("values.csv").split()[1:]]
        # what the node received as `previous`: the released (noisy) aggregate
        seen = None if previous is None else previous["total"]
        return {"sum": sum(values), "seen": seen}

    def aggregate(results, epoch, previous):
        seen = {r["seen"] for r in results.values()}
        expected = {None} if previous is None else {previous["total"]}
        assert seen == expected, "the nodes got another value than aggregate's previous"
        total = sum(r["sum"] for r in results.values())
        return {"total": flame.dp.laplace(total, sensitivity=1.0, epsilon=0.5), "epoch": epoch}
    """
)
VALUES = {"node-1": [1000.0, 2000.123456789], "node-2": [3000.0], "node-3": [1777.0]}  # sum: EXACT


def write_analysis(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "analysis.py").write_text(ANALYSIS)
    for node, values in VALUES.items():
        (folder / "data" / node).mkdir(parents=True)
        (folder / "data" / node / "values.csv").write_text(
            "value\n" + "\n".join(repr(v) for v in values) + "\n"
        )
    assert math.isclose(sum(sum(v) for v in VALUES.values()), EXACT)
    return folder


def test_simulate_releases_each_epoch_once_and_charges_it(tmp_path: Path) -> None:
    from flame.analysis.loader import load_analysis

    folder = write_analysis(tmp_path / "study")
    functions = load_analysis(folder / "analysis.py").functions
    policy = tmp_path / "aggregator.toml"
    policy.write_text('epsilon_budget = 2.0\nledger_dir = "ledger"\n')
    result = flame.simulate(
        functions.analyze,
        functions.aggregate,
        data=folder / "data",
        epochs=3,
        aggregator_policy=policy,
    )
    ledger = entries(tmp_path / "ledger")
    assert [(e["epoch"], e["epsilon"]) for e in ledger] == [(0, 0.5), (1, 0.5), (2, 0.5)]
    assert result.value["total"] != EXACT and abs(result.value["total"] - EXACT) < 200
    assert [r.privacy["aggregator"]["spend"]["epsilon"] for r in result.history] == [0.5] * 3
    assert result.history[-1].privacy["aggregator"]["spent_total"]["epsilon"] == 1.5
    with pytest.raises(
        RunFailed, match=r"no central-DP budget: set epsilon_budget.*aggregator_policy="
    ):  # no budget: refused
        flame.simulate(functions.analyze, functions.aggregate, data=folder / "data")


def test_cli_budget_refusal_leaves_no_exact_value_anywhere(tmp_path: Path) -> None:
    folder = write_analysis(tmp_path / "study")
    policy = tmp_path / "aggregator.toml"
    policy.write_text('epsilon_budget = 1.2\nledger_dir = "ledger"\n')
    output = tmp_path / "out" / "run.json"
    output.parent.mkdir()
    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAME_")}
    env["FLAME_STORAGE__RESULTS_DIR"] = str(store)
    env["FLAME_LOG_LEVEL"] = "DEBUG"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flame",
            "simulate",
            str(folder / "analysis.py"),
            "--data",
            str(folder / "data"),
            "--epochs",
            "4",
            "--aggregator-policy",
            str(policy),
            "--output",
            str(output),
            "--verbose",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "central DP refused epoch 2's aggregate" in done.stderr
    assert "epsilon_budget" in done.stderr and "aggregator--aggregate.json" in done.stderr
    assert [e["epoch"] for e in entries(tmp_path / "ledger")] == [0, 1]
    document = json.loads(output.read_text())
    assert document["history"] and len(document["history"]) == 2
    from flame.ops.report import write_report

    write_report(str(output), tmp_path / "report.html")  # what `flame report` renders
    texts = {"stdout": done.stdout.encode(), "stderr": done.stderr.encode()}
    texts["report"] = (tmp_path / "report.html").read_bytes()
    assert b"<th>aggregator</th>" in texts["report"]  # its spend, beside the nodes'
    for path in [output, *store.rglob("*"), *(tmp_path / "ledger").rglob("*")]:
        if path.is_file():
            texts[str(path)] = path.read_bytes()
    released = repr(document["history"][-1]["summary"]["total"]).encode()  # epoch 1, noisy
    kept = [where for where, data in texts.items() if released in data and str(store) in where]
    assert kept, "the search does not see the values the run store keeps"
    exact = [EXACT_TEXT.encode(), struct.pack("<d", EXACT), struct.pack(">d", EXACT)]
    leaked = [where for where, data in texts.items() if any(form in data for form in exact)]
    assert not leaked, f"the exact aggregate is in {leaked}"


# --- flame run: the aggregation node of a real federation over Mosquitto ------------------------


def test_flame_run_aggregator_applies_its_own_budget_over_a_real_broker(
    mqtt_broker: Any, tmp_path: Path
) -> None:
    from nodes import Federation, federation_env

    folder = write_analysis(tmp_path / "study")
    nodes = sorted(VALUES)
    policy = tmp_path / "aggregator-policy.toml"  # min_cell_count: a node rule, ignored here
    policy.write_text('epsilon_budget = 1.2\nmin_cell_count = 5\nledger_dir = "ledger"\n')

    def federation(name: str, epochs: int) -> Federation:
        env = federation_env(
            mqtt_broker, f"central-{os.getpid()}-{name}", nodes, epochs=epochs,
            presence_timeout=90, epoch_timeout=90,
        )  # fmt: skip
        return Federation(env, folder / "analysis.py", folder / "data", nodes, tmp_path / name)

    released = federation("released", epochs=2)
    try:
        released.start("aggregator", FLAME_POLICY=str(policy))
        for node in nodes:
            released.start(node)
        values = released.finish()
    finally:
        released.close()
    assert (
        values["aggregator"]["total"] != EXACT and abs(values["aggregator"]["total"] - EXACT) < 200
    )
    assert all(values[node] == values["aggregator"] for node in nodes)  # one draw, for everyone
    assert [(e["epoch"], e["epsilon"]) for e in entries(tmp_path / "ledger")] == [
        (0, 0.5),
        (1, 0.5),
    ]

    refused = federation("refused", epochs=1)  # 0.2 of 1.2 left: epoch 0 is refused
    try:
        aggregator = refused.start("aggregator", FLAME_POLICY=str(policy))
        for node in nodes:
            refused.start(node)
        assert aggregator.wait(120) == 1
        for node in nodes:
            assert refused.processes[node].wait(120) != 0
    finally:
        refused.close()
    assert "central DP refused epoch 0's aggregate" in aggregator.stderr()
    assert "rule: epsilon_budget" in aggregator.stderr() and "FLAME_POLICY" in aggregator.stderr()
    assert len(entries(tmp_path / "ledger")) == 2
    outputs = [p for p in (tmp_path / "refused").rglob("*") if p.is_file()]
    assert outputs
    leaked = [str(p) for p in outputs if EXACT_TEXT in p.read_text(errors="replace")]
    assert not leaked, f"the exact aggregate is in {leaked}"

"""Differential privacy on the node: noise scales (Kolmogorov-Smirnov against the stated
distributions), the budget ledger refusing before analyze runs, also after a restart.

OpenDP's samplers draw from a CSPRNG and cannot be seeded (reproducible noise would be a
privacy bug), so the KS tests use a fixed sample size and a significance of 1e-5: a correct
sampler fails them once in 100 000 runs, while a 25 % wrong scale fails them every time."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flame
from flame.dp import add_noise, gaussian_sigma, noise_scale
from flame.errors import FlameError, RunFailed
from flame.isolation.runner import Outcome
from flame.privacy.ledger import BudgetLedger, Spend
from flame.privacy.release import Gate

N = 20_000
KS_CRITICAL = math.sqrt(-math.log(1e-5 / 2) / 2) / math.sqrt(N)


def ks_distance(sample: np.ndarray, cdf: Any) -> float:
    x = np.sort(sample)
    f = cdf(x)
    above = np.arange(1, x.size + 1) / x.size - f
    below = f - np.arange(0, x.size) / x.size
    return float(max(above.max(), below.max()))


def laplace_cdf(scale: float) -> Any:
    return lambda x: np.where(x < 0, 0.5 * np.exp(x / scale), 1 - 0.5 * np.exp(-x / scale))


def normal_cdf(sigma: float) -> Any:
    erf = np.vectorize(math.erf)
    return lambda x: 0.5 * (1 + erf(x / (sigma * math.sqrt(2))))


def test_laplace_noise_has_scale_sensitivity_over_epsilon() -> None:
    marker = flame.dp.laplace(np.zeros(N), sensitivity=2.0, epsilon=0.5)
    assert noise_scale(marker) == 4.0
    noise = add_noise(marker.values, "laplace", noise_scale(marker), "x")
    assert ks_distance(noise, laplace_cdf(4.0)) < KS_CRITICAL
    assert ks_distance(noise, laplace_cdf(5.0)) > KS_CRITICAL  # the test can tell scales apart
    assert ks_distance(noise, laplace_cdf(3.2)) > KS_CRITICAL


def test_gaussian_noise_has_the_sigma_opendp_proves_for_epsilon_delta() -> None:
    sigma = gaussian_sigma(1.0, 1.0, 1e-5)
    classic = math.sqrt(2 * math.log(1.25 / 1e-5)) / 1.0  # Dwork-Roth bound: looser
    assert 3.0 < sigma < classic
    import opendp.combinators as comb
    import opendp.prelude as dp

    dp.enable_features("contrib")
    proof = comb.make_fix_delta(
        comb.make_zCDP_to_approxDP(
            dp.m.make_gaussian(
                dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=sigma
            )
        ),
        1e-5,
    )
    epsilon, delta = proof.map(1.0)
    assert epsilon <= 1.0 + 1e-9 and delta <= 1e-5
    marker = flame.dp.gaussian(np.zeros(N), sensitivity=1.0, epsilon=1.0, delta=1e-5)
    noise = add_noise(marker.values, "gaussian", noise_scale(marker), "x")
    assert ks_distance(noise, normal_cdf(sigma)) < KS_CRITICAL
    assert ks_distance(noise, normal_cdf(1.25 * sigma)) > KS_CRITICAL


def test_distributed_gaussian_shares_sum_to_the_full_noise() -> None:
    k = 4
    marker = flame.dp.gaussian(np.zeros(N), 1.0, 1.0, 1e-5, contributors=k)
    sigma = gaussian_sigma(1.0, 1.0, 1e-5)
    assert noise_scale(marker) == pytest.approx(sigma / 2)
    total = sum(add_noise(marker.values, "gaussian", noise_scale(marker), "x") for _ in range(k))
    assert ks_distance(np.asarray(total), normal_cdf(sigma)) < KS_CRITICAL


def test_distributed_noise_outside_secure_is_refused(tmp_path: Path) -> None:
    gate = Gate(flame.NodePolicy(), node_id="a", analysis_id="x")
    outcome = Outcome({"s": flame.dp.gaussian(1.0, 1.0, 1.0, 1e-5, contributors=3)}, 10)
    with pytest.raises(flame.PolicyRefused, match=r"only safe inside flame\.secure"):
        gate.release(0, outcome)


def test_bad_parameters_are_named() -> None:
    with pytest.raises(FlameError, match="epsilon must be positive"):
        flame.dp.laplace(1.0, 1.0, 0.0)
    with pytest.raises(FlameError, match="delta must be positive and below 1"):
        flame.dp.gaussian(1.0, 1.0, 1.0, 1.0)
    with pytest.raises(FlameError, match="finite"):
        add_noise(np.array([1.0, np.nan]), "laplace", 1.0, "field")
    assert flame.dp.clip([-5, 5, 50], 0, 10).tolist() == [0, 5, 10]
    clipped = flame.dp.clip_norm([[3.0, 4.0], [0.3, 0.4]], 1.0)
    assert np.allclose(np.linalg.norm(clipped, axis=1), [1.0, 0.5])


def test_ledger_charges_refuses_and_survives_a_new_instance(tmp_path: Path) -> None:
    ledger = BudgetLedger(tmp_path, "node", "cohort", 1.0, 0.0)
    assert ledger.charge(Spend(0.6), analysis="a", epoch=0) == Spend(0.6)
    again = BudgetLedger(tmp_path, "node", "cohort", 1.0, 0.0)  # as after a restart
    assert again.remaining().epsilon == pytest.approx(0.4)
    with pytest.raises(flame.PolicyRefused, match="epsilon_budget"):
        again.charge(Spend(0.6), analysis="b", epoch=0)
    assert again.spent() == Spend(0.6)  # a refused spend is not recorded
    (tmp_path / "node--cohort.json").write_text("{broken")
    with pytest.raises(flame.PolicyRefused, match="cannot be read"):
        again.check(Spend(0.1), "x")


BUDGET = """
import sys
import flame

@flame.dp.spends(epsilon=0.6)
def analyze(data):
    # the isolated child may write its scratch folder only: it says that it ran on stderr
    print("RAN", flame.context().node_id, file=sys.stderr, flush=True)
    return {"sum": flame.dp.sum("v", epsilon=0.6)}

def aggregate(results):
    return sum(r["sum"] for r in results.values())
"""


def test_second_run_over_budget_refuses_before_analyze_also_after_restart(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "budget.py").write_text(BUDGET)
    policy = tmp_path / "policy.toml"
    policy.write_text('epsilon_budget = 1.0\nbudget_scope = "cohort"\n[dp_bounds]\nv = [0, 10]\n')
    data = tmp_path / "data"
    for node in ("a", "b"):
        (data / node).mkdir(parents=True)
        (data / node / "x.csv").write_text("v\n1\n2\n")

    def simulate_process() -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLAME_")}
        command = [sys.executable, "-m", "flame", "simulate", str(tmp_path / "budget.py")]
        command += ["--data", str(data), "--policy", str(policy), "--quiet"]
        return subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
        )

    first = simulate_process()  # each run is a new process: the ledger is all that remains
    assert first.returncode == 0, first.stderr
    second = simulate_process()
    assert second.returncode == 1
    assert "epsilon_budget" in second.stderr and "0.4 of 1 left" in second.stderr
    assert first.stderr.count("RAN a") == 1 and first.stderr.count("RAN b") == 1
    assert "RAN" not in second.stderr
    # in one process, too, with the policy given as an object
    from flame.analysis.loader import load_analysis

    f = load_analysis(tmp_path / "budget.py").functions
    same = flame.load_policy(policy)
    capfd.readouterr()
    with pytest.raises(RunFailed, match="epsilon_budget"):
        flame.simulate(f.analyze, f.aggregate, data=data, policy=same)
    assert "RAN" not in capfd.readouterr().err  # analyze did not run again


def test_dp_mean_example_is_close_to_pooled_and_spends_its_budget(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "dp_mean"
    from flame.analysis.loader import load_analysis

    f = load_analysis(example).functions
    policy = flame.load_policy(example / "policy.toml").model_copy(update={"ledger_dir": tmp_path})
    run = flame.simulate(f.analyze, f.aggregate, data=example / "data", policy=policy)
    result = run.value
    record = run.history[0].to_dict()  # what the manifest keeps per epoch
    assert record["privacy"]["clinic_b"]["spend"] == {"epsilon": 1.0, "delta": 0.0}
    assert record["privacy"]["clinic_b"]["spent_total"] == {"epsilon": 1.0, "delta": 0.0}
    ages = np.concatenate(
        [np.loadtxt(p, skiprows=1, ndmin=1) for p in sorted((example / "data").rglob("*.csv"))]
    )
    # noise: 3 nodes x Laplace(200) on the sum (sd ~490 on ~10 000), Laplace(2) on n
    assert abs(result["mean"] - ages.mean()) < 15
    assert abs(result["n"] - ages.size) < 30
    ledger = BudgetLedger(tmp_path, "clinic_a", "patients", 3.0, 0.0)
    assert ledger.spent() == Spend(1.0)

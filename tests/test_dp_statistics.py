"""Runtime DP statistics (`flame.dp.sum/mean/count/histogram`): the node reads the column,
clips it to the data holder's public bounds, derives the sensitivity with OpenDP and draws
the noise; the analyst's own sensitivity is refused under a budget unless the policy trusts
it. A refused release spends nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flame
import flame.privacy.release as release_module
from flame.errors import ConfigError, FlameError
from flame.isolation.runner import Outcome
from flame.privacy.ledger import BudgetLedger
from flame.privacy.policy import NodePolicy
from flame.privacy.release import Gate

AGES = np.array([30.0, 45.0, np.nan, 200.0, -5.0, 61.0])  # one missing, two out of bounds


def _gate(tmp_path: Path, **policy: Any) -> Gate:
    settings: dict[str, Any] = {"epsilon_budget": 2.0, "ledger_dir": tmp_path}
    settings.update(policy)
    gate = Gate(NodePolicy(**settings), node_id="a", analysis_id="x")
    gate.reader = lambda column, file, source: {"age": AGES}[column]
    return gate


@pytest.fixture
def draws(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, str, float]]:
    """Every noise draw the gate makes: (exact value, mechanism, scale); returns value + 1."""
    seen: list[tuple[Any, str, float]] = []

    def fake(values: Any, mechanism: str, scale: float, path: str) -> Any:
        seen.append((values, mechanism, scale))
        return np.asarray(values, dtype=np.float64) + 1.0

    monkeypatch.setattr(release_module, "add_noise", fake)
    return seen


def _spent(tmp_path: Path) -> float:
    return BudgetLedger(tmp_path, "a", "default", 2.0, 0.0).spent().epsilon


def test_sum_clips_to_the_holders_bounds_and_scales_noise_by_them(
    tmp_path: Path, draws: list[tuple[Any, str, float]]
) -> None:
    gate = _gate(tmp_path, dp_bounds={"age": (0.0, 100.0)})
    released = gate.release(0, Outcome({"s": flame.dp.sum("age", epsilon=0.5)}, 0))
    ((exact, mechanism, scale),) = draws
    assert exact == 30 + 45 + 100 + 0 + 61  # NaN dropped, 200 -> 100, -5 -> 0
    assert mechanism == "laplace"
    assert scale == pytest.approx(100 / 0.5, rel=1e-6)  # OpenDP's bound, no analyst claim
    assert released.result == {"s": exact + 1.0}
    assert _spent(tmp_path) == pytest.approx(0.5)


def test_count_histogram_and_gaussian_derive_their_own_sensitivity(
    tmp_path: Path, draws: list[tuple[Any, str, float]]
) -> None:
    gate = _gate(tmp_path, delta_budget=1e-3)
    body = {
        "n": flame.dp.count("age", epsilon=0.5),
        "h": flame.dp.histogram("age", [0, 50, 100], epsilon=0.5),
        "g": flame.dp.count("age", epsilon=0.5, delta=1e-5),
    }
    gate.release(0, Outcome(body, 0))
    (n, n_mech, n_scale), (h, _, h_scale), (g, g_mech, g_scale) = draws
    assert n == 5 and n_mech == "laplace" and n_scale == pytest.approx(2.0)
    assert np.asarray(h).tolist() == [2.0, 1.0] and h_scale == pytest.approx(2.0)
    from flame.dp import gaussian_sigma

    assert g == 5 and g_mech == "gaussian"
    assert g_scale == pytest.approx(gaussian_sigma(1.0, 0.5, 1e-5))
    assert _spent(tmp_path) == pytest.approx(1.5)


def test_mean_splits_epsilon_and_stays_within_the_bounds(
    tmp_path: Path, draws: list[tuple[Any, str, float]]
) -> None:
    gate = _gate(tmp_path, dp_clamp=(0.0, 100.0))  # a global clamp covers every column
    released = gate.release(0, Outcome({"m": flame.dp.mean("age", epsilon=1.0)}, 0))
    (total, _, s_scale), (n, _, n_scale) = draws
    assert s_scale == pytest.approx(200.0, rel=1e-6) and n_scale == pytest.approx(2.0)
    assert released.result["m"] == pytest.approx((total + 1) / (n + 1))
    assert _spent(tmp_path) == pytest.approx(1.0)


def test_refusals_name_the_rule_and_spend_nothing(
    tmp_path: Path, draws: list[tuple[Any, str, float]]
) -> None:
    gate = _gate(tmp_path)
    cases = [
        ({"s": flame.dp.sum("age", epsilon=0.5)}, r"'s'.*no public bounds.*rule: dp_bounds"),
        ({"x": flame.dp.laplace(45.0, 1e-9, 0.1)}, r"'x'.*rule: trust_sensitivity = false"),
        ({"m": flame.secure(flame.dp.mean("age", epsilon=0.5))}, "does not add up"),
    ]
    for body, match in cases:
        with pytest.raises(flame.PolicyRefused, match=match):
            gate.release(0, Outcome({**body, "n": flame.dp.count("age", epsilon=0.5)}, 0))
    assert _spent(tmp_path) == 0
    small = _gate(tmp_path, min_rows=10)  # the statistic covers 6 records
    with pytest.raises(flame.PolicyRefused, match="rule: min_rows"):
        small.release(0, Outcome({"n": flame.dp.count("age", epsilon=0.5)}, 0))
    assert _spent(tmp_path) == 0


def test_trusted_sensitivity_and_no_budget_keep_the_raw_markers(
    tmp_path: Path, draws: list[tuple[Any, str, float]]
) -> None:
    trusted = _gate(tmp_path, trust_sensitivity=True)
    trusted.release(0, Outcome({"x": flame.dp.laplace(45.0, 2.0, 0.5)}, 1))
    assert draws[-1][2] == pytest.approx(4.0)
    no_dp = Gate(NodePolicy(), node_id="a", analysis_id="x")  # the policy requires no DP
    no_dp.release(0, Outcome({"x": flame.dp.laplace(45.0, 2.0, 0.5)}, 1))
    assert draws[-1][2] == pytest.approx(4.0)


def test_a_forged_statistic_marker_is_refused(tmp_path: Path) -> None:
    from flame.dp import Statistic

    gate = _gate(tmp_path, dp_bounds={"age": (0.0, 100.0)})
    forged = [
        Statistic("sum", "age", -1.0),
        Statistic("sum", "age", 0.5, contributors=0),
        Statistic("median", "age", 0.5),
        Statistic("histogram", "age", 0.5, bins=[5.0, 1.0]),
        Statistic("sum", "age", 0.5, bins=[0.0, 1.0]),
    ]
    for marker in forged:
        with pytest.raises(flame.PolicyRefused, match=r"flame\.dp at 'f'"):
            gate.release(0, Outcome({"f": marker}, 1))
    assert _spent(tmp_path) == 0
    with pytest.raises(FlameError, match="increasing"):
        flame.dp.histogram("age", [3, 2, 1], epsilon=1.0)


def test_policy_bounds_are_validated_and_read_from_toml(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lower <= upper"):
        NodePolicy(dp_bounds={"age": (5.0, 1.0)})
    path = tmp_path / "policy.toml"
    path.write_text("epsilon_budget = 1.0\ndp_clamp = [0, 1]\n[dp_bounds]\nage = [0, 120]\n")
    policy = flame.load_policy(path)
    assert policy.bounds_for("age") == (0.0, 120.0) and policy.bounds_for("bmi") == (0.0, 1.0)
    assert policy.derives_sensitivity
    path.write_text("[dp_bounds]\nage = [0, inf]\n")
    with pytest.raises(ConfigError, match="dp_bounds"):
        flame.load_policy(path)


def test_a_distributed_sum_inside_secure_splits_the_derived_noise(
    tmp_path: Path, draws: list[tuple[Any, str, float]]
) -> None:
    from flame.dp import gaussian_sigma, measure

    gate = _gate(tmp_path, dp_bounds={"age": (0.0, 100.0)}, delta_budget=1e-3)
    gate.min_contributors = 3
    marker = flame.dp.sum("age", epsilon=0.5, delta=1e-5, contributors=3)
    with pytest.raises(flame.PolicyRefused, match=r"only safe inside flame\.secure"):
        gate.release(0, Outcome({"s": marker}, 0))
    gate.release(0, Outcome({"s": flame.secure(marker)}, 0))
    ((_, mechanism, scale),) = draws
    sensitivity = measure("sum", AGES[~np.isnan(AGES)], (0.0, 100.0), None, "gaussian")[1]
    assert sensitivity == pytest.approx(100.0, rel=1e-6)
    assert mechanism == "gaussian"
    assert scale == pytest.approx(gaussian_sigma(sensitivity, 0.5, 1e-5) / np.sqrt(3))
    assert _spent(tmp_path) == pytest.approx(0.5)

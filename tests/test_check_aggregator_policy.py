"""`flame check` on the aggregation node reads FLAME_POLICY as `flame run` does there: the
operator's central-DP budget, not a node policy."""

from __future__ import annotations

from pathlib import Path

from flame.config import load_config
from flame.ops.node_checks import _check_policy
from flame.privacy.central import CentralDP, load_aggregator_policy
from flame.privacy.ledger import Spend


def _config(tmp_path: Path, text: str, role: str = "aggregation"):  # type: ignore[no-untyped-def]
    policy = tmp_path / "policy.toml"
    policy.write_text(text)
    return load_config(
        analysis_id="check-central",
        node_id="agg" if role == "aggregation" else "clinic-a",
        role=role,
        participants=["clinic-a", "clinic-b"],
        policy=str(policy),
    )


def test_the_aggregator_budget_and_what_is_left_of_it(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    text = f'epsilon_budget = 2.0\nbudget_scope = "cohort"\nledger_dir = "{ledger}"\n'
    config = _config(tmp_path, text)
    central = CentralDP(
        load_aggregator_policy(config.policy), node_id="agg", analysis_id="earlier-run"
    )
    assert central.ledger is not None
    central.ledger.charge(Spend(0.5), analysis="earlier-run", epoch=0)

    item = _check_policy(config)

    assert item.verdict == "ok", item
    assert "aggregator central DP" in item.detail and "budget_scope=cohort" in item.detail
    assert "left: epsilon 1.5" in item.detail


def test_no_budget_on_the_aggregator_says_markers_are_refused(tmp_path: Path) -> None:
    # a node rule in the file is not the aggregator's: ignored there, as `flame run` does
    item = _check_policy(_config(tmp_path, "min_cell_count = 10\n"))
    assert item.verdict == "ok" and "no central-DP budget" in item.detail


def test_a_misspelt_setting_fails_the_check_naming_it(tmp_path: Path) -> None:
    item = _check_policy(_config(tmp_path, "epsilon_budgt = 1.0\n"))
    assert item.verdict == "FAIL" and "epsilon_budgt" in item.detail


def test_an_analysis_node_still_reads_its_node_policy(tmp_path: Path) -> None:
    item = _check_policy(_config(tmp_path, "min_cell_count = 10\n", role="analysis"))
    assert item.verdict == "ok" and "min_cell_count=10" in item.detail
    assert "aggregator" not in item.detail

"""The node policy's allow-list, `release = "protected"`, from the hostile analysis's seat:
approved code that returns (or sends) a raw record value, unmarked, under a node whose data
protection officer set a DP budget. Under "protected" only values inside flame.dp markers
and flame.secure leave; anything else is refused naming the field and the rule, never the
value, before anything is charged or sent. The default, "any", is unchanged."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import flame
from flame.analysis.loader import load_analysis
from flame.config import load_config
from flame.errors import RunFailed
from flame.ops.node_checks import _check_policy
from flame.privacy.ledger import BudgetLedger
from flame.privacy.policy import NodePolicy
from flame.transport.memory import MemoryBroker

AGES = [93817, 20, 30, 40, 50, 60, 70, 80, 90, 45, 55, 65]  # the first is the "record"
NODES = {
    f"node-{i}": {"x.csv": "age,name\n" + "".join(f"{a},Zyxwv{a}\n" for a in AGES)}
    for i in range(2)
}
SECRETS = ("93817", "Zyxwv")  # nowhere in a refusal's text or the logs

HOSTILE = """
import numpy as np
import pandas as pd
import flame

def analyze(data):
    t = data.read_csv()
    age = t["age"]
    return {"out": {"x": %s}}

def aggregate(results):
    return {k: r["out"]["x"] for k, r in results.items()}
"""


def _run(tmp_path: Path, source: str, policy: Any, *, isolate: bool = True, **kw: Any) -> Any:
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(source))
    functions = load_analysis(path).functions
    return flame.simulate(
        functions.analyze, functions.aggregate, data=NODES, isolate=isolate, policy=policy, **kw
    )


def _policy(tmp_path: Path, **rules: Any) -> NodePolicy:
    folder = tmp_path / "ledger"
    folder.mkdir(exist_ok=True)
    return NodePolicy(epsilon_budget=1.0, ledger_dir=folder, **rules)


def _spent(tmp_path: Path) -> list[float]:
    return [
        BudgetLedger(tmp_path / "ledger", node, "default", 1.0, 0.0).spent().epsilon
        for node in NODES
    ]


UNPROTECTED = {
    "float": ("float(age[0])", "a number"),
    "array": ("np.asarray(age)", "an array"),
    "table": ("pd.DataFrame({'age': age})", "a table"),
    "string": ("str(t['name'][0])", "a string"),
    "bool": ("bool(age[0] > 90000)", "a bool"),
    "counts": ("flame.counts(int(age[0]))", "a number"),  # >= min_cell_count: no protection
}


@pytest.mark.parametrize("case", sorted(UNPROTECTED))
def test_an_unprotected_value_is_refused_naming_the_field_not_the_value(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    expression, kind = UNPROTECTED[case]
    policy = _policy(tmp_path, release="protected", min_cell_count=5)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RunFailed) as failure:
        _run(tmp_path, HOSTILE % expression, policy)
    text = str(failure.value)
    assert "field 'out.x'" in text and "rule: release = protected" in text, text
    assert kind in text, text
    for secret in SECRETS:
        assert secret not in text and secret not in caplog.text
    assert _spent(tmp_path) == [0.0, 0.0]


def test_analyze_in_the_runtimes_process_is_refused_under_the_rule(tmp_path: Path) -> None:
    """Code in the runtime's own process could undo any rule (it may patch the gate): the
    node refuses to run analyze there before it reads anything, naming isolation."""
    policy = _policy(tmp_path, release="protected")
    with pytest.raises(RunFailed, match=r"isolated.*rule: release = protected") as failure:
        _run(tmp_path, HOSTILE % "float(age[0])", policy, isolate=False)
    assert "93817" not in str(failure.value)
    with pytest.raises(ValidationError, match="isolate = true"):
        NodePolicy(release="protected", epsilon_budget=1.0, isolate=False)


def test_the_default_any_still_lets_the_raw_value_out(tmp_path: Path) -> None:
    """The hole this rule closes, still open by default (no behaviour change)."""
    run = _run(tmp_path, HOSTILE % "float(age[0])", _policy(tmp_path))
    assert run.value == {node: 93817.0 for node in NODES}
    assert _run(tmp_path, HOSTILE % "float(age[0])", None, isolate=False).value[
        "node-0"
    ] == pytest.approx(93817.0)


PROTECTED = """
import flame

def analyze(data):
    age = data.read_csv()["age"]
    return {"sum": flame.dp.sum("age", epsilon=0.1),
            "hist": flame.dp.histogram("age", [0, 50, 100], epsilon=0.1),
            "mean": flame.dp.mean("age", epsilon=0.1),
            "raw": flame.dp.laplace(float(age[0]), 1.0, 0.1),
            "nested": [flame.dp.laplace([float(a) for a in age[:3]], 1.0, 0.1), None],
            "nothing": None, "empty": {}, "none": [], "also": {"deep": [{}, None]}}

def aggregate(results):
    return results
"""


def test_dp_markers_none_and_empty_containers_pass(tmp_path: Path) -> None:
    policy = _policy(
        tmp_path, release="protected", trust_sensitivity=True, dp_bounds={"age": (0.0, 100.0)}
    )
    run = _run(tmp_path, PROTECTED, policy)
    for result in run.value.values():
        assert result["raw"] != 93817.0 and isinstance(result["raw"], float)
        assert result["nothing"] is None and result["empty"] == {} and result["none"] == []
        assert result["also"] == {"deep": [{}, None]}
    assert _spent(tmp_path) == [pytest.approx(0.5)] * len(NODES)


SECURE = """
import flame

def analyze(data):
    t = data.read_csv()
    return {"total": flame.secure(%s, bound=1e6)}

def aggregate(results):
    return {"total": results.secure["total"]}
"""


def test_secure_fields_pass_only_around_noised_values(tmp_path: Path) -> None:
    """flame.secure alone is no protection against the analysis (each node's record in a slot
    of its own makes the sum the list of records): its values must be noised by the node."""
    policy = _policy(tmp_path, release="protected", trust_sensitivity=True)
    with pytest.raises(RunFailed, match=r"inside flame.secure.*rule: release = protected") as no:
        _run(tmp_path, SECURE % 'float(t["age"][0])', policy, secure=True)
    assert "93817" not in str(no.value)
    run = _run(tmp_path, SECURE % 'flame.dp.laplace(float(t["age"][0]), 1.0, 0.1)', policy,
               secure=True)
    assert run.value["total"] != pytest.approx(2 * 93817.0, abs=1e-6)
    assert run.value["total"] == pytest.approx(2 * 93817.0, abs=400)  # noised, then summed


MESSAGE = """
import flame

def analyze(data):
    age = data.read_csv()["age"]
    try:
        flame.context().send("leak", {"x": %s}, to=["aggregator"])
    except flame.PolicyRefused:
        pass  # caught: the epoch fails all the same
    return {"n": flame.dp.count("age", epsilon=0.1)}

def aggregate(results):
    return results
"""


def _watched(category: str) -> tuple[MemoryBroker, list[Any]]:
    seen: list[Any] = []

    def watch(envelope: Any) -> bool:
        if envelope.kind == "message" and envelope.category == category:
            seen.append(envelope.body)
        return True

    return MemoryBroker(on_send=watch), seen


def test_a_message_with_a_raw_value_is_refused_before_it_leaves(tmp_path: Path) -> None:
    broker, seen = _watched("leak")
    policy = _policy(tmp_path, release="protected")
    with pytest.raises(RunFailed) as failure:
        _run(tmp_path, MESSAGE % "float(age[0])", policy, broker=broker)
    text = str(failure.value)
    assert "field 'x'" in text and "rule: release = protected" in text, text
    assert "93817" not in text
    assert seen == [] and _spent(tmp_path) == [0.0, 0.0]
    noised = MESSAGE % 'flame.dp.sum("age", epsilon=0.1)'
    rules = {"release": "protected", "dp_bounds": {"age": (0.0, 100.0)}}
    run = _run(tmp_path, noised, _policy(tmp_path, **rules), broker=broker)
    assert len(seen) == len(NODES) and set(run.value) == set(NODES)
    assert all(isinstance(b["x"], float) for b in seen)


CHARGED_FIRST = """
import flame

def analyze(data):
    age = data.read_csv()["age"]
    return {"a": flame.dp.sum("age", epsilon=0.5), "b": int(age[0])}

def aggregate(results):
    return results
"""


def test_a_refusal_after_a_noised_field_charges_nothing(tmp_path: Path) -> None:
    """Field "a" is noised (its draw checked against the budget) before "b" is refused:
    the refusal says nothing about the noisy value, so nothing is charged, and the
    declared budget is all there for the next run."""
    policy = _policy(tmp_path, release="protected", dp_bounds={"age": (0.0, 100.0)})
    with pytest.raises(RunFailed, match=r"field 'b'.*rule: release = protected"):
        _run(tmp_path, CHARGED_FIRST, policy)
    assert _spent(tmp_path) == [0.0, 0.0]
    ledger = tmp_path / "ledger"
    assert not any(json.loads(p.read_text()).get("entries") for p in ledger.glob("*.json"))


def _check(tmp_path: Path, text: str) -> str:
    policy = tmp_path / "policy.toml"
    policy.write_text(text + f'ledger_dir = "{tmp_path / "ledger"}"\n')
    config = load_config(
        analysis_id="check-release",
        node_id="clinic-a",
        role="analysis",
        participants=["clinic-a", "clinic-b"],
        policy=str(policy),
    )
    item = _check_policy(config)
    assert item.verdict == "ok", item
    return item.detail


def test_flame_check_warns_when_a_budget_lets_unmarked_values_out(tmp_path: Path) -> None:
    detail = _check(tmp_path, "epsilon_budget = 1.0\n")
    assert 'WARNING: release = "any"' in detail and 'set release = "protected"' in detail
    assert "WARNING" not in _check(tmp_path, 'epsilon_budget = 1.0\nrelease = "protected"\n')
    assert "WARNING" not in _check(tmp_path, "min_cell_count = 5\n")  # no budget: no DP promise


def test_protected_withholds_progress_and_error_text(tmp_path: Path) -> None:
    """Progress is a number analyze picks, error text may quote a record: neither leaves
    under the allow-list (send_tracebacks may still be set true explicitly)."""
    from flame.privacy.release import Gate

    protected = NodePolicy(release="protected", epsilon_budget=1.0, ledger_dir=tmp_path)
    assert Gate(protected, node_id="n", analysis_id="a").lets_progress_out(10**6) is False
    assert Gate(NodePolicy(), node_id="n", analysis_id="a").lets_progress_out(10**6) is True
    assert protected.send_tracebacks is False and NodePolicy().send_tracebacks is True
    assert (
        NodePolicy(release="protected", epsilon_budget=1.0, send_tracebacks=True).send_tracebacks
        is True
    )

"""What `analyze` sends to other nodes (`flame.context().send`) passes the node's release
checks like its result: min_rows on the rows read so far, small cells, DP noise and budget;
refused with the rule named, never the body, and the refusal fails the epoch even when the
analysis catches it. The aggregator's messages and what nodes receive are not touched."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flame
from flame.analysis.loader import load_analysis
from flame.errors import RunFailed
from flame.privacy.disclosure import reveal_suppressed
from flame.privacy.ledger import BudgetLedger
from flame.privacy.policy import NodePolicy
from flame.transport.memory import MemoryBroker

NODES = {f"node-{i}": {"x.csv": "v\n" + "".join(f"{j}\n" for j in range(12))} for i in range(2)}
EXACT_SUM = float(sum(range(12)))


def _simulate(tmp_path: Path, source: str, policy: Any, *, isolate: bool, **kw: Any) -> Any:
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(source))
    functions = load_analysis(path).functions
    return flame.simulate(
        functions.analyze, functions.aggregate, data=NODES, isolate=isolate, policy=policy, **kw
    )


def _bodies(category: str) -> tuple[MemoryBroker, list[Any]]:
    """A memory broker recording the bodies of every message of `category` it carries."""
    seen: list[Any] = []

    def watch(envelope: Any) -> bool:
        if envelope.kind == "message" and envelope.category == category:
            seen.append(envelope.body)
        return True

    return MemoryBroker(on_send=watch), seen


SECRET_ROWS = """
import flame

def analyze(data):
    rows = data.read_text("x.csv").split()[:3]  # header and two records: under min_rows
    try:
        flame.context().send("notes", {"rows": "|".join(rows) + "|side"}, to=["aggregator"])
    except flame.PolicyRefused:
        pass  # caught: the epoch must fail all the same
    return {"n": 1}

def aggregate(results):
    return results
"""


@pytest.mark.parametrize("isolate", [False, True])
def test_a_refused_message_names_the_rule_not_the_payload_even_if_caught(
    tmp_path: Path, isolate: bool
) -> None:
    """The file holds 12 records (all served by read_text), min_rows is 13: the message is
    refused, the body never reaches the broker, and the reason survives send_tracebacks =
    false (it is the node's, not the analysis's) while the body is nowhere in it."""
    broker, seen = _bodies("notes")
    policy = NodePolicy(min_rows=13, send_tracebacks=False)
    with pytest.raises(RunFailed) as failure:
        _simulate(tmp_path, SECRET_ROWS, policy, isolate=isolate, broker=broker)
    text = str(failure.value)
    assert "message refused (rule: min_rows)" in text, text
    assert "|side" not in text and "0|1" not in text, text
    assert seen == [], "the refused message reached the broker"


CELLS = """
import numpy as np
import flame

def analyze(data):
    v = data.read_csv()["v"]
    cells = np.array([2, int(v.size) * 4])  # one small cell (2), one large (48)
    try:
        flame.context().send("cells", flame.counts(cells), to=["aggregator"])
    except flame.PolicyRefused:
        return {"caught": True}
    return {"caught": False}

def aggregate(results):
    got = flame.context().receive("cells", senders=list(results), timeout=10)
    return {"results": results, "messages": got.messages}
"""


def test_small_cells_in_a_message_are_suppressed_before_it_leaves(tmp_path: Path) -> None:
    broker, seen = _bodies("cells")
    policy = NodePolicy(min_cell_count=5)
    run = _simulate(tmp_path, CELLS, policy, isolate=True, broker=broker)
    assert len(seen) == len(NODES)
    for body in seen:  # on the wire: the small cell is 0 plus a mask bit
        cells = reveal_suppressed(body)
        assert isinstance(cells, np.ma.MaskedArray)
        assert cells.data.tolist() == [0, 48] and cells.mask.tolist() == [True, False]
    assert set(run.value["messages"]) == set(NODES)
    record = run.history[0].to_dict()["privacy"]["node-0"]
    assert record["messages"]["sent"] == 1 and record["messages"]["suppressed"] == {"value": 1}


def test_small_cells_in_a_message_refuse_the_epoch_in_refuse_mode(tmp_path: Path) -> None:
    broker, seen = _bodies("cells")
    policy = NodePolicy(min_cell_count=5, on_small_cell="refuse")
    with pytest.raises(RunFailed, match=r"on_small_cell = refuse"):
        _simulate(tmp_path, CELLS, policy, isolate=False, broker=broker)
    assert seen == []


SECURE = """
import flame

def analyze(data):
    flame.context().send("s", flame.secure(float(data.read_csv()["v"].sum())), to=["aggregator"])
    return {"n": 1}

def aggregate(results):
    return results
"""


def test_secure_in_a_message_is_refused_it_would_leave_in_the_clear(tmp_path: Path) -> None:
    broker, seen = _bodies("s")
    with pytest.raises(RunFailed, match=r"messages are not encrypted"):
        _simulate(tmp_path, SECURE, NodePolicy(), isolate=False, broker=broker)
    assert seen == []


def _ledger(tmp_path: Path, spent: float) -> Path:
    folder = tmp_path / "ledger"
    folder.mkdir(exist_ok=True)
    for node in NODES:
        entries = [{"analysis": "old", "epoch": 0, "epsilon": spent, "delta": 0.0, "time": 0}]
        (folder / f"{node}--default.json").write_text(json.dumps({"entries": entries}))
    return folder


def _spent(folder: Path, node: str) -> float:
    return BudgetLedger(folder, node, "default", 1.0, 0.0).spent().epsilon


NOISY = """
import flame

def analyze(data):
    total = float(data.read_csv()["v"].sum())
    flame.context().send("noisy", flame.dp.laplace(total, 1.0, 0.4), to=["aggregator"])
    return {"n": 1}

def aggregate(results):
    return flame.context().receive("noisy", senders=list(results), timeout=10).messages
"""


def test_dp_noise_in_a_message_is_drawn_and_charged_on_the_node(tmp_path: Path) -> None:
    folder = _ledger(tmp_path, 0.0)
    policy = NodePolicy(epsilon_budget=1.0, ledger_dir=folder, trust_sensitivity=True)
    broker, seen = _bodies("noisy")
    run = _simulate(tmp_path, NOISY, policy, isolate=True, broker=broker)
    assert len(seen) == len(NODES) and all(isinstance(b, float) for b in seen)
    assert all(b != EXACT_SUM for b in seen)  # Laplace(2.5): never exactly the sum
    assert sorted(run.value.values()) == sorted(seen)
    for node in NODES:
        assert _spent(folder, node) == pytest.approx(0.4)
        report = run.history[0].to_dict()["privacy"][node]
        assert report["messages"] == {"sent": 1, "spend": {"epsilon": 0.4, "delta": 0.0}}
        assert report["spent_total"]["epsilon"] == pytest.approx(0.4)


def test_a_message_over_budget_is_refused_and_spends_nothing(tmp_path: Path) -> None:
    folder = _ledger(tmp_path, 0.9)
    policy = NodePolicy(epsilon_budget=1.0, ledger_dir=folder, trust_sensitivity=True)
    broker, seen = _bodies("noisy")
    with pytest.raises(RunFailed, match="epsilon_budget"):
        _simulate(tmp_path, NOISY, policy, isolate=False, broker=broker)
    assert seen == []
    assert all(_spent(folder, node) == pytest.approx(0.9) for node in NODES)


def test_a_dp_policy_refuses_the_analysts_sensitivity_in_a_message_too(tmp_path: Path) -> None:
    """Under a budget (trust_sensitivity = false) a message's flame.dp.laplace is refused
    like a result's; flame.dp.sum, whose sensitivity the node derives from its bounds, is
    sent noised and charged."""
    folder = _ledger(tmp_path, 0.0)
    policy = NodePolicy(epsilon_budget=1.0, ledger_dir=folder, dp_bounds={"v": (0.0, 10.0)})
    broker, seen = _bodies("noisy")
    with pytest.raises(RunFailed, match=r"rule: trust_sensitivity = false"):
        _simulate(tmp_path, NOISY, policy, isolate=True, broker=broker)
    assert seen == [] and all(_spent(folder, node) == 0 for node in NODES)
    statistic = NOISY.replace("flame.dp.laplace(total, 1.0, 0.4)", 'flame.dp.sum("v", epsilon=0.4)')
    run = _simulate(tmp_path, statistic, policy, isolate=True, broker=broker)
    assert len(seen) == len(NODES) and all(b != 65.0 for b in seen)  # clipped sum: 65
    assert sorted(run.value.values()) == sorted(seen)
    assert all(_spent(folder, node) == pytest.approx(0.4) for node in NODES)


CHATTY = """
import flame

def analyze(data):
    ctx = flame.context()
    v = data.read_csv()["v"]
    others = [n for n in ctx.participants if n != ctx.node_id]
    ctx.send("peer", {"max": float(v.max())}, to=others, timeout=10)
    return {"peers": ctx.receive("peer", senders=others, timeout=10).messages}

def aggregate(results):
    acked = flame.context().send("hello", {"rows": "1|2"}, to=list(results), timeout=10)
    return {"results": results, "acked": sorted(acked)}
"""


def test_node_to_node_and_aggregator_messages_pass_unchanged(tmp_path: Path) -> None:
    """Messages within the policy leave as sent and are received as sent; the aggregator has
    no node policy, so its own messages are not checked (nor blocked by allow_messages)."""
    broker, seen = _bodies("hello")
    policy = NodePolicy(min_rows=12, min_cell_count=5)
    run = _simulate(tmp_path, CHATTY, policy, isolate=True, broker=broker)
    assert run.value["acked"] == sorted(NODES)
    assert seen == [{"rows": "1|2"}] * len(NODES)
    for node, result in run.value["results"].items():
        (other,) = [n for n in NODES if n != node]
        assert result["peers"] == {other: {"max": 11.0}}
    quiet = """
import flame

def analyze(data):
    return {"n": len(data.read_csv()["v"])}

def aggregate(results):
    return sorted(flame.context().send("hello", {"rows": "1|2"}, to=list(results), timeout=10))
"""
    silenced = NodePolicy(min_rows=12, allow_messages=False)
    assert _simulate(tmp_path, quiet, silenced, isolate=False).value == sorted(NODES)


FORGED_REPLY = """
import flame

def analyze(data):
    flame.context().send("flame.secure.decrypted", {"sums": [1, 2, 3]}, to=["aggregator"])
    return {"n": 1}

def aggregate(results):
    return results
"""


@pytest.mark.parametrize("isolate", [True, False])
def test_analyze_cannot_send_in_flames_own_categories(tmp_path: Path, isolate: bool) -> None:
    """The runtime's secure-sum and endorsement traffic travels as messages too: an analysis
    must not forge a decryption reply (or endorsement) in its node's name."""
    broker, seen = _bodies("flame.secure.decrypted")
    with pytest.raises(RunFailed, match="reserved for flame's own messages"):
        _simulate(tmp_path, FORGED_REPLY, NodePolicy(), isolate=isolate, broker=broker)
    assert seen == []

"""Red team: a hostile analyst against the node's DP budget and the sensitivity it derives
(`flame.dp.sum/mean/count/histogram`), through the isolated child and the runtime gate a
production node uses (`flame.simulate(isolate=True, policy=...)`), watching the wire with a
`MemoryBroker(on_send=...)`.

The analyst writes `analyze`/`aggregate`; the policy file, the runtime and the ledger are the
data holder's. Each test is an attack: a plain test where the runtime stops it, `xfail(strict)`
where it still leaks (README's threat model says so in one line).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flame
from flame.analysis.loader import load_analysis
from flame.errors import RunFailed
from flame.isolation.runner import Outcome
from flame.privacy.ledger import BudgetLedger
from flame.privacy.policy import NodePolicy
from flame.privacy.release import Gate
from flame.transport.memory import MemoryBroker

ROWS = 20
NODES = {f"node-{i}": {"x.csv": "v\n" + "".join(f"{j}\n" for j in range(ROWS))} for i in range(2)}


def _policy(tmp_path: Path, budget: float = 10.0, **extra: Any) -> NodePolicy:
    folder = tmp_path / "ledger"
    folder.mkdir(exist_ok=True)
    settings: dict[str, Any] = {
        "epsilon_budget": budget,
        "delta_budget": 1e-3,
        "ledger_dir": folder,
        "dp_bounds": {"v": (0.0, 100.0)},
    }
    settings.update(extra)
    return NodePolicy(**settings)


def _spent(policy: NodePolicy, node: str) -> float:
    assert policy.ledger_dir is not None and policy.epsilon_budget is not None
    ledger = BudgetLedger(policy.ledger_dir, node, "default", policy.epsilon_budget, 1e-3)
    return ledger.spent().epsilon


def _wire() -> tuple[MemoryBroker, list[Any]]:
    """A broker recording every envelope it carries (results, messages, status)."""
    seen: list[Any] = []

    def watch(envelope: Any) -> bool:
        seen.append(envelope)
        return True

    return MemoryBroker(on_send=watch), seen


def _simulate(tmp_path: Path, source: str, policy: NodePolicy, **kw: Any) -> Any:
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(source))
    functions = load_analysis(path).functions
    return flame.simulate(
        functions.analyze, functions.aggregate, data=NODES, isolate=True, policy=policy, **kw
    )


# --- the refusal as an oracle ----------------------------------------------------------------

NOISY_CELL = """
import flame

def analyze(data):
    # never reads a row itself: the runtime counts v and decides small or not on the noisy value
    return {"n": flame.counts(flame.dp.count("v", epsilon=%(epsilon)r))}

def aggregate(results):
    return results
"""


def test_a_refusal_decided_on_a_noisy_value_is_charged(tmp_path: Path) -> None:
    """Small-cell rule in refuse mode on a noisy count: whether the epoch is refused says
    whether noisy count < min_cell_count. It was refused *before* the ledger was charged, so
    the bit was free: rerun the (even approved) code a thousand times and the refusal rate
    gives the exact count back at no cost. The noise the decision saw must be charged."""
    policy = _policy(tmp_path, min_cell_count=10**6, on_small_cell="refuse")  # always small
    broker, wire = _wire()
    with pytest.raises(RunFailed, match="rule: on_small_cell = refuse"):
        _simulate(tmp_path, NOISY_CELL % {"epsilon": 0.5}, policy, broker=broker)
    assert not [e for e in wire if e.kind == "result"]
    for node in NODES:
        assert _spent(policy, node) == pytest.approx(0.5), "the refusal's bit was not charged"


def test_a_noisy_refusal_that_the_budget_cannot_cover_draws_no_noise(tmp_path: Path) -> None:
    """Budget checked before each draw: a statistic the budget cannot cover is refused for
    the budget (the same answer whatever the data) before its noise is drawn, so no refusal
    can depend on uncharged noise."""
    policy = _policy(tmp_path, budget=0.4, min_cell_count=10**6, on_small_cell="refuse")
    with pytest.raises(RunFailed, match="rule: epsilon_budget"):
        _simulate(tmp_path, NOISY_CELL % {"epsilon": 0.5}, policy)
    assert all(_spent(policy, node) == 0 for node in NODES)


def test_the_gate_checks_the_budget_before_it_draws(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flame.privacy.release as release_module

    draws: list[float] = []

    def fake(values: Any, mechanism: str, scale: float, path: str) -> Any:
        draws.append(scale)
        return float(values) + 1.0

    monkeypatch.setattr(release_module, "add_noise", fake)
    gate = Gate(_policy(tmp_path, budget=1.0), node_id="a", analysis_id="x")
    gate.reader = lambda column, file, source: np.arange(20.0)
    body = {"a": flame.dp.count("v", epsilon=0.6), "b": flame.dp.count("v", epsilon=0.6)}
    with pytest.raises(flame.PolicyRefused, match="epsilon_budget"):
        gate.release(0, Outcome(body, 0))
    assert len(draws) == 1, "noise drawn for a statistic the budget could not cover"


# --- accounting ------------------------------------------------------------------------------

MANY = """
import flame

def analyze(data):
    ctx = flame.context()
    ctx.send("peek", {"c": flame.dp.count("v", epsilon=0.25)}, to=[ctx.aggregator_id])
    ctx.send("peek", {"c": flame.dp.count("v", epsilon=0.25)}, to=[ctx.aggregator_id])
    same = flame.dp.count("v", epsilon=0.5)
    return {"same": [same] * 4,                                     # 4 releases, not 1
            "mean": flame.dp.mean("v", epsilon=1.0),                # split, charged in full
            "hist": flame.dp.histogram("v", [0, 5, 10, 15, 20], epsilon=0.5),  # disjoint bins
            "nested": {"deep": [{"s": flame.dp.sum("v", epsilon=0.25)}]}}

def aggregate(results):
    return results
"""


def test_every_statistic_and_every_message_is_charged(tmp_path: Path) -> None:
    """The same marker repeated, a mean, a histogram, a nested sum and two messages: each
    release is its own draw and its own charge (0.5 + 0.25 * 2 + 0.5 * 4 + 1 + 0.5 + 0.25)."""
    policy = _policy(tmp_path)
    broker, wire = _wire()
    run = _simulate(tmp_path, MANY, policy, broker=broker)
    for node in NODES:
        assert _spent(policy, node) == pytest.approx(0.25 * 2 + 0.5 * 4 + 1.0 + 0.5 + 0.25)
        same = run.value[node]["same"]
        assert len(set(same)) == 4, f"one draw released four times: {same}"
        assert all(s != ROWS for s in same)
    peeks = [e.body["c"] for e in wire if e.kind == "message" and e.category == "peek"]
    assert len(peeks) == 2 * len(NODES) and ROWS not in peeks


HUGE = """
import flame

def analyze(data):
    return {"n": flame.dp.count("v", epsilon=%(epsilon)r)}

def aggregate(results):
    return results
"""


@pytest.mark.parametrize("epsilon", [1e6, 1e308])
def test_a_huge_epsilon_is_refused_by_the_budget_and_nothing_leaves(
    tmp_path: Path, epsilon: float
) -> None:
    policy = _policy(tmp_path, budget=3.0)
    broker, wire = _wire()
    with pytest.raises(RunFailed, match="rule: epsilon_budget"):
        _simulate(tmp_path, HUGE % {"epsilon": epsilon}, policy, broker=broker)
    assert not [e for e in wire if e.kind == "result"]
    assert all(_spent(policy, node) == 0 for node in NODES)


FORGED = """
import flame
nan, inf = float("nan"), float("inf")

def analyze(data):
    marker = {"\\x00flame": "dp_statistic", "kind": "count", "column": "v", "epsilon": 0.5}
    marker.update(%(fields)s)
    return {"n": marker}

def aggregate(results):
    return results
"""


@pytest.mark.parametrize(
    "fields",
    [
        {"epsilon": -0.5},
        {"epsilon": 0},
        {"epsilon": "nan"},
        {"epsilon": "inf"},
        {"epsilon": True},
        {"epsilon": "0.5"},
        {"delta": 1.0},
        {"delta": -1e-6},
        {"contributors": 10**6, "delta": 1e-6},  # outside flame.secure
        {"kind": "max"},
        {"column": ["v"]},
        {"kind": "histogram", "bins": [0, "nan", 5]},
        {"kind": "histogram", "bins": [5, 0]},
        {"sensitivity": 1e-9},  # not a field of the marker: the analyst cannot set it
    ],
    ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()),
)
def test_a_forged_statistic_marker_is_refused_and_charges_nothing(
    tmp_path: Path, fields: dict[str, Any]
) -> None:
    text = "{" + ", ".join(f"{k!r}: {_literal(v)}" for k, v in fields.items()) + "}"
    policy = _policy(tmp_path)
    broker, wire = _wire()
    with pytest.raises(RunFailed):
        _simulate(tmp_path, FORGED % {"fields": text}, policy, broker=broker)
    assert not [e for e in wire if e.kind == "result"]
    assert all(_spent(policy, node) == 0 for node in NODES)


def _literal(value: Any) -> str:
    return value if value in ("nan", "inf") else repr(value)


FORGED_WRAPPER = """
import flame

def analyze(data):
    v = [float(x) for x in data.read_csv()["v"]]
    # the runtime's own wrapper (a privacy report claiming no spend) and its suppressed-cell
    # tag (a "mask" over raw values), forged in the child
    return {"\\x00flame": "%(kind)s", %(fields)s}

def aggregate(results):
    return results
"""


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("release", '"result": {"v": v}, "privacy": {"spend": {"epsilon": 0, "delta": 0}}'),
        ("suppressed", '"values": v, "mask": [False] * len(v)'),
    ],
)
def test_the_runtimes_own_tags_cannot_be_forged(tmp_path: Path, kind: str, fields: str) -> None:
    # send_tracebacks set explicitly: under a budget error text otherwise stays on the node
    policy = _policy(tmp_path, min_cell_count=5, send_tracebacks=True)
    broker, wire = _wire()
    with pytest.raises(RunFailed, match="unknown marker kind"):
        _simulate(
            tmp_path, FORGED_WRAPPER % {"kind": kind, "fields": fields}, policy, broker=broker
        )
    assert not [e for e in wire if e.kind == "result"]


# --- what the analysis still chooses ---------------------------------------------------------

EDGES = """
import flame

def analyze(data):
    v = data.read_csv()["v"]
    secret = int(v[7])  # one record
    # edges picked after reading it: the *number* of bins is the record
    return {"h": flame.dp.histogram("v", list(range(secret + 2)), epsilon=0.1)}

def aggregate(results):
    return {node: len(r["h"]) - 1 for node, r in results.items()}
"""


@pytest.mark.xfail(
    strict=True,
    reason="open: histogram edges are the analysis's choice; edges picked after reading the "
    "data leave in the result's shape (README threat model)",
)
def test_histogram_edges_chosen_after_reading_do_not_release_a_record(tmp_path: Path) -> None:
    run = _simulate(tmp_path, EDGES, _policy(tmp_path))
    assert run.value != dict.fromkeys(NODES, 7), "the record left as the number of bins"


# --- min_rows and what a statistic covers ----------------------------------------------------

SPARSE = {
    f"node-{i}": {"x.csv": "v,w\n" + "".join(f"{j},{'' if j > 1 else 40 + j}\n" for j in range(20))}
    for i in range(2)
}  # 20 records; w is recorded for two of them only

MEAN_OF_W = """
import flame

def analyze(data):
    return {"w": flame.dp.mean("w", epsilon=5.0)}

def aggregate(results):
    return results
"""


def test_a_statistic_over_a_mostly_missing_column_is_judged_by_the_values_it_holds(
    tmp_path: Path,
) -> None:
    """min_rows = 10: "each statistic must cover min_rows records". A column recorded for two
    patients out of twenty was judged by its twenty rows, while the statistic (missing values
    dropped) was of two: their mean left, noised but with min_rows met in name only."""
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(MEAN_OF_W))
    functions = load_analysis(path).functions
    policy = _policy(tmp_path, min_rows=10, dp_bounds={"w": (0.0, 100.0)})
    broker, wire = _wire()
    with pytest.raises(RunFailed, match="rule: min_rows"):
        flame.simulate(
            functions.analyze,
            functions.aggregate,
            data=SPARSE,
            isolate=True,
            policy=policy,
            broker=broker,
        )
    assert not [e for e in wire if e.kind == "result"]
    assert all(_spent(policy, node) == 0 for node in SPARSE)


NOTES = """
import flame

def analyze(data):
    ctx = flame.context()
    try:  # a message first: its refusal text came back to analyze and went to the aggregator
        ctx.send("n", flame.dp.count("v", epsilon=0.5, file="notes.csv"), to=[ctx.aggregator_id])
    except flame.PolicyRefused:
        pass
    return {"n": flame.dp.count("v", epsilon=0.5, file="notes.csv")}

def aggregate(results):
    return results
"""


def test_the_runtimes_parse_error_does_not_quote_a_record(tmp_path: Path) -> None:
    """The runtime reads the file a statistic names. A malformed row (a free-text field with
    a comma) made its parser fail with the row in the message, and that message was the
    node's own (not the analysis's): it left in full, past send_tracebacks = false and
    min_rows. The node refuses without the parser's words."""
    notes = "v,note\n1,ok\n2,Jane Roe HIV positive, seen 3/4\n"
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(NOTES))
    functions = load_analysis(path).functions
    policy = _policy(tmp_path, min_rows=10, send_tracebacks=False)
    broker, wire = _wire()
    with pytest.raises(RunFailed) as failure:
        flame.simulate(
            functions.analyze,
            functions.aggregate,
            data={node: {"notes.csv": notes} for node in NODES},
            isolate=True,
            policy=policy,
            broker=broker,
        )
    assert "Jane Roe" not in str(failure.value), str(failure.value)
    assert "could not read" in str(failure.value)
    assert not [e for e in wire if "Jane Roe" in repr(e.body)]


def test_a_statistic_reads_no_file_hidden_from_the_analysis(tmp_path: Path) -> None:
    """The child cannot open a data-folder symlink into a hidden node path (keys, tokens,
    policy, ledger); the runtime reading a statistic's `file=` for it could. It checks the
    same way now, for a named file and for all CSV files."""
    import os

    from flame.data import Data
    from flame.privacy.release import column_reader

    secret = tmp_path / "secrets"
    secret.mkdir()
    (secret / "k.csv").write_text("v\n42\n")
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "k.csv").symlink_to(secret / "k.csv")
    data = Data.from_path(folder, node_id="a")
    open_reader = column_reader(data)
    assert open_reader is not None and open_reader("v", "k.csv", None).tolist() == [42.0]
    reader = column_reader(data, [os.path.realpath(secret)])
    assert reader is not None
    for file in ("k.csv", None):
        with pytest.raises(flame.PolicyRefused, match="could not read"):
            reader("v", file, None)

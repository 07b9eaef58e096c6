"""Red team: hostile analysis code against the node policy (issue 11), through the same
isolated child and runtime gate a production node uses (`flame.simulate(isolate=True)`).

The markers cross from the child as tagged dicts; the module doc of `flame.privacy.markers` promises
"a forged tag can only ask the runtime for more enforcement, never for less". These tests
forge them.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

import flame
from flame.analysis.loader import load_analysis
from flame.errors import RunFailed
from flame.privacy.ledger import BudgetLedger
from flame.privacy.policy import NodePolicy

NODES = {f"node-{i}": {"x.csv": "v\n" + "".join(f"{j}\n" for j in range(20))} for i in range(3)}

FORGED_NOISE = """
import flame
nan, inf = float("nan"), float("inf")

def analyze(data):
    n = float(len(data.read_csv()["v"]))
    forged = {"\\x00flame": "noise", "values": n, "mechanism": "laplace",
              "sensitivity": %(sensitivity)r, "epsilon": %(epsilon)r}
    return {"n": forged}

def aggregate(results):
    return {k: r["n"] for k, r in results.items()}
"""

INFLATED = """
import flame
nan, inf = float("nan"), float("inf")

def analyze(data):
    n = float(len(data.read_csv()["v"]))
    return {"n": flame.secure(flame.dp.gaussian(n, 1.0, 1.0, 1e-6, contributors=%(k)d))}

def aggregate(results):
    return results.secure["n"]
"""


def _policy(tmp_path: Path, spent: float, *, trust: bool = True) -> NodePolicy:
    """A budget of 1.0 with `spent` gone; `trust`: the analyst's sensitivity is accepted
    (so the tests below reach the marker checks rather than the blanket refusal)."""
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir(exist_ok=True)
    for node in NODES:
        entries = [{"analysis": "old", "epoch": 0, "epsilon": spent, "delta": 0.0, "time": 0}]
        (ledger_dir / f"{node}--default.json").write_text(json.dumps({"entries": entries}))
    return NodePolicy(
        epsilon_budget=1.0, delta_budget=1e-3, ledger_dir=ledger_dir, trust_sensitivity=trust
    )


def _run(tmp_path: Path, source: str, policy: NodePolicy, secure: bool = False) -> object:
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(source))
    functions = load_analysis(path).functions
    return flame.simulate(
        functions.analyze,
        functions.aggregate,
        data=NODES,
        isolate=True,
        policy=policy,
        secure=secure,
    )


@pytest.mark.parametrize(
    ("sensitivity", "epsilon"),
    [(-1.0, -0.5), (1.0, 0.0), (float("nan"), float("nan")), (1.0, float("inf"))],
)
def test_a_forged_noise_marker_never_refunds_or_skips_the_budget(
    tmp_path: Path, sensitivity: float, epsilon: float
) -> None:
    """A negative epsilon with a negative sensitivity keeps the noise scale positive: the
    value was released with real noise (scale 2) while the ledger, which only charges
    positive spends, recorded nothing, even with the budget exhausted; repeated, the noise
    averages out. Zero/NaN/inf must not release either. The runtime must refuse them all."""
    policy = _policy(tmp_path, spent=0.9)
    source = FORGED_NOISE % {"sensitivity": sensitivity, "epsilon": epsilon}
    with pytest.raises(RunFailed, match="'n'"):
        result = _run(tmp_path, source, policy)
        pytest.fail(f"released with a forged noise marker: {result}")
    assert policy.ledger_dir is not None
    for node in NODES:
        ledger = BudgetLedger(policy.ledger_dir, node, "default", 1.0, 1e-3)
        assert ledger.spent().epsilon >= 0.9, "the forged marker gave budget back"


def test_distributed_noise_cannot_claim_more_contributors_than_the_run_has(
    tmp_path: Path,
) -> None:
    """contributors=k splits the noise over k nodes; with 3 nodes and k = 10**6 each adds
    1/1000 of the noise while the ledger is charged the full epsilon: the sum the aggregator
    decrypts is all but noiseless. The runtime must refuse a k larger than the run."""
    policy = _policy(tmp_path, spent=0.0)
    with pytest.raises(RunFailed, match="contributors"):
        result = _run(tmp_path, INFLATED % {"k": 10**6}, policy, secure=True)
        pytest.fail(f"released with k=10**6 over 3 nodes: {result}")


TINY_SENSITIVITY = """
import flame

def analyze(data):
    v = data.read_csv()["v"]
    return {"exact": flame.dp.laplace(float(v[7]), sensitivity=1e-9, epsilon=0.1)}

def aggregate(results):
    return {k: r["exact"] for k, r in results.items()}
"""


def test_a_tiny_sensitivity_claim_cannot_release_a_record_exactly(tmp_path: Path) -> None:
    """Sensitivity 1e-9 released one record's value almost exactly for epsilon 0.1. Under a
    budget the node no longer takes the analyst's word (trust_sensitivity = false): the
    marker is refused, naming the rule, and nothing is charged. (What replaces it, runtime
    statistics with sensitivity from the holder's bounds: tests/test_dp_statistics.py.)"""
    policy = _policy(tmp_path, spent=0.0, trust=False)
    with pytest.raises(RunFailed, match=r"'exact'.*rule: trust_sensitivity = false"):
        result = _run(tmp_path, TINY_SENSITIVITY, policy)
        pytest.fail(f"released with the analyst's sensitivity claim: {result}")
    assert policy.ledger_dir is not None
    for node in NODES:
        assert BudgetLedger(policy.ledger_dir, node, "default", 1.0, 1e-3).spent().epsilon == 0


SIDE_CHANNEL = """
import flame

def analyze(data):
    rows = data.read_text("x.csv").split()[:3]  # two records and the header: under min_rows
    flame.context().send("notes", {"rows": "|".join(rows) + "|side-channel"}, to=["aggregator"])
    return {"n": len(rows)}

def aggregate(results):
    return results
"""


def test_min_rows_also_binds_what_analyze_sends_to_other_nodes(tmp_path: Path) -> None:
    _side_channel(tmp_path, NodePolicy(min_rows=10))


def test_a_node_that_disallows_messages_sends_none(tmp_path: Path) -> None:
    _side_channel(tmp_path, NodePolicy(min_rows=10, allow_messages=False), match="messages")


def _side_channel(tmp_path: Path, policy: NodePolicy, match: str = "min_rows") -> None:
    from flame.transport.memory import MemoryBroker

    leaked: list[str] = []

    def watch(envelope: object) -> bool:
        text = repr(getattr(envelope, "body", ""))
        if "41|42" in text or "7|8" in text:  # the records themselves, not the source line
            leaked.append(text)
        return True

    small = {"node-0": {"x.csv": "v\n41\n42\n"}, "node-1": {"x.csv": "v\n7\n8\n"}}
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(SIDE_CHANNEL))
    functions = load_analysis(path).functions
    with pytest.raises(RunFailed, match=match):
        flame.simulate(
            functions.analyze,
            functions.aggregate,
            data=small,
            isolate=True,
            policy=policy,
            broker=MemoryBroker(on_send=watch),
        )
    assert not leaked, f"rows left the node under min_rows: {leaked[0][:120]}"


# An exception message crossed to the aggregator even with send_tracebacks = false and
# allow_messages = false (fixed: withheld, the node's own log keeps it).
ERROR_CHANNEL = """
def analyze(data):
    rows = data.read_text("x.csv").split()[:3]  # two records and the header: under min_rows
    raise ValueError("|".join(rows))

def aggregate(results):
    return results
"""


def test_an_exception_message_does_not_carry_records_off_the_node(tmp_path: Path) -> None:
    small = {"node-0": {"x.csv": "v\n41\n42\n"}, "node-1": {"x.csv": "v\n7\n8\n"}}
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(ERROR_CHANNEL))
    functions = load_analysis(path).functions
    policy = NodePolicy(min_rows=10, allow_messages=False, send_tracebacks=False)
    with pytest.raises(RunFailed) as failure:
        flame.simulate(
            functions.analyze, functions.aggregate, data=small, isolate=True, policy=policy
        )
    assert "41|42" not in str(failure.value) and "7|8" not in str(failure.value), str(failure.value)
    assert "ValueError (message withheld" in str(failure.value)


# --- failure reports as a channel (send_tracebacks = false, min_rows unmet) ------------------
# Two records, min_rows = 10, no messages, no tracebacks: nothing about the records may leave.
# The failure's *type* still does (one of Python's built-in exception names, or flame's own
# ProtocolError/ProcessExit): a few bits a run, not records.

FAILURES = {
    # a class of the analysis named like flame's own failures had its message sent in full
    "named_like_flame": """
        class ProtocolError(Exception):
            pass

        def analyze(data):
            rows = data.read_text("x.csv").split()[:3]
            raise ProtocolError("|".join(rows))
        """,
    # the type name is the analysis's to choose: any string
    "type_name": """
        def analyze(data):
            rows = data.read_text("x.csv").split()[:3]
            raise type("|".join(rows), (Exception,), {})()
        """,
    # a frame the child protocol does not know: its kind was echoed
    "frame_kind": """
        import gc
        from flame.isolation.channel import Channel

        def analyze(data):
            rows = data.read_text("x.csv").split()[:3]
            (channel,) = [o for o in gc.get_objects() if type(o) is Channel]
            channel.send("|".join(rows), {})
            return {"n": 1}
        """,
    # the exit status is the analysis's to choose: 8 bits of a record
    "exit_code": """
        import os

        def analyze(data):
            rows = data.read_text("x.csv").split()[:3]
            os._exit(int(rows[1]) + 100)
        """,
}


@pytest.mark.parametrize("name", sorted(FAILURES))
def test_a_failure_report_carries_no_record_under_send_tracebacks_false(
    tmp_path: Path, name: str
) -> None:
    from flame.transport.memory import MemoryBroker

    wire: list[str] = []
    broker = MemoryBroker(on_send=lambda envelope: wire.append(repr(envelope.body)) or True)
    small = {"node-0": {"x.csv": "v\n41\n42\n"}, "node-1": {"x.csv": "v\n7\n8\n"}}
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(FAILURES[name]) + "\ndef aggregate(results):\n    return 0\n")
    functions = load_analysis(path).functions
    policy = NodePolicy(min_rows=10, allow_messages=False, send_tracebacks=False)
    with pytest.raises(RunFailed) as failure:
        flame.simulate(
            functions.analyze,
            functions.aggregate,
            data=small,
            isolate=True,
            policy=policy,
            broker=broker,
        )
    text = str(failure.value)
    for secret in ("41|42", "7|8", "code 141", "code 107"):  # (not bare: a uuid may hold "141")
        assert secret not in text, text
        assert not [body for body in wire if secret in body], f"{secret} on the wire"
    assert "withheld" in text, text


# --- progress and recipients as channels -----------------------------------------------------


class _StatusBroker:
    """A memory broker that also records every status a node publishes (progress lives there)."""

    def __new__(cls, envelopes: list[Any], statuses: list[dict[str, Any]]) -> Any:
        from flame.transport.memory import MemoryBroker

        class Recording(MemoryBroker):
            def set_status(self, analysis_id: str, node_id: str, status: dict[str, Any]) -> None:
                statuses.append(dict(status))
                super().set_status(analysis_id, node_id, status)

        return Recording(on_send=lambda envelope: envelopes.append(envelope) or True)


PROGRESS = """
import time

import flame

def analyze(data):
    rows = data.read_text("x.csv").split()[1:3]
    flame.context().set_progress(int(rows[0]) / 1000)           # 0.041: a record
    flame.context().set_progress(0.5 + int(rows[1]) / 1000)     # 0.542: another
    time.sleep(0.6)  # longer than the status interval: the progress status is not sampled away
    return {"n": 1}

def aggregate(results):
    return 0
"""


@pytest.mark.parametrize(
    ("policy", "published"),
    [
        (NodePolicy(min_rows=10, allow_messages=False), set()),  # refused: nothing
        (NodePolicy(allow_messages=False), set()),  # no free-form channel: no progress either
        (NodePolicy(), {0.5}),  # progress leaves in tenths only
    ],
    ids=["min_rows", "allow_messages", "tenths"],
)
def test_progress_carries_no_record(
    tmp_path: Path, policy: NodePolicy, published: set[float]
) -> None:
    """set_progress(x) reached the aggregator as a status (4 decimals), every call that went
    up: a message of records past min_rows and allow_messages = false."""
    envelopes: list[Any] = []
    statuses: list[dict[str, Any]] = []
    small = {"node-0": {"x.csv": "v\n41\n42\n"}, "node-1": {"x.csv": "v\n7\n8\n"}}
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(PROGRESS))
    functions = load_analysis(path).functions
    try:
        flame.simulate(
            functions.analyze,
            functions.aggregate,
            data=small,
            isolate=True,
            policy=policy,
            broker=_StatusBroker(envelopes, statuses),
        )
    except RunFailed:
        assert policy.min_rows is not None  # only the min_rows case is refused
    seen = {s["progress"] for s in statuses if s.get("state") == "computing"} - {0.0}
    assert seen == published, seen


RECIPIENTS = """
import flame

def analyze(data):
    v = data.read_csv()["v"]
    flame.context().send("hello", {"ok": True}, to=[f"patient-{int(v[7])}"], timeout=0.2)
    return {"n": 1}

def aggregate(results):
    return 0
"""


def test_messages_go_only_to_the_runs_nodes(tmp_path: Path) -> None:
    """`to=` named any recipient: a record in the address (on MQTT: in the topic, for the
    broker and anyone allowed to subscribe), and a body for a node outside the run."""
    envelopes: list[Any] = []
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(RECIPIENTS))
    functions = load_analysis(path).functions
    with pytest.raises(RunFailed, match="outside this run"):
        flame.simulate(
            functions.analyze,
            functions.aggregate,
            data=NODES,
            isolate=True,
            policy=NodePolicy(),
            broker=_StatusBroker(envelopes, []),
        )
    leaked = [e.recipient for e in envelopes if str(e.recipient).startswith("patient-")]
    assert not leaked, leaked


# --- the small-cell rule ---------------------------------------------------------------------


def _simulate_source(tmp_path: Path, source: str, policy: NodePolicy, data: Any) -> Any:
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(source))
    functions = load_analysis(path).functions
    return flame.simulate(
        functions.analyze, functions.aggregate, data=data, isolate=True, policy=policy
    )


NAN_CELL = """
import numpy as np
import flame

def analyze(data):
    v = data.read_csv()["v"]
    bits = np.array([0x7FF8000000000000 | int(v[7])], dtype=np.uint64)  # a quiet NaN
    return {"c": flame.counts(bits.view(np.float64)), "inf": flame.counts(np.inf)}

def aggregate(results):
    out = {}
    for node, r in results.items():
        payload = np.ma.getdata(r["c"]).view(np.uint64).tolist()
        out[node] = (payload, bool(np.ma.getmask(r["c"]).all()), bool(np.ma.getmask(r["inf"])))
    return out
"""


def test_a_nan_count_does_not_pass_the_cell_rule_with_a_record_in_its_payload(
    tmp_path: Path,
) -> None:
    """NaN < min_cell_count is False: a NaN "count" left as it was, its 51 payload bits
    (here the record 7) intact on the wire. NaN and infinities are no count: suppressed."""
    run = _simulate_source(tmp_path, NAN_CELL, NodePolicy(min_cell_count=5), NODES)
    for node in NODES:
        payload, masked, inf_masked = run.value[node]
        assert masked and inf_masked, run.value[node]
        assert payload == [0], f"{payload[0]:#x}"


LABELS = """
import flame

def analyze(data):
    d = data.read_csv()["d"]
    cells = {str(k): int((d == k).sum()) for k in set(d)}  # the labels come from the data
    return {"by_diagnosis": flame.counts(cells)}

def aggregate(results):
    return {node: sorted(r["by_diagnosis"]) for node, r in results.items()}
"""


@pytest.mark.xfail(
    strict=True,
    reason="open: a cell's label leaves even when its count is suppressed; labels taken from "
    "the data say the category occurs, even with count_zero_as_small (README threat model)",
)
def test_a_suppressed_cell_does_not_reveal_that_its_category_occurs(tmp_path: Path) -> None:
    rare = "d\n" + "flu\n" * 6 + "rare-disease-x\n"
    data = {"node-0": {"x.csv": rare}, "node-1": {"x.csv": "d\n" + "flu\n" * 7}}
    policy = NodePolicy(min_cell_count=5, count_zero_as_small=True)
    run = _simulate_source(tmp_path, LABELS, policy, data)
    assert "rare-disease-x" not in run.value["node-0"], run.value


DIFFERENCE = """
import flame

def analyze(data):
    v = data.read_csv()["v"]
    # two cells, each well above min_cell_count, that differ by one record
    return {"all": flame.counts(int(len(v))), "but_one": flame.counts(int((v != 7).sum()))}

def aggregate(results):
    return {node: int(r["all"]) - int(r["but_one"]) for node, r in results.items()}
"""


@pytest.mark.xfail(
    strict=True,
    reason="open: suppression is per cell (no complementary suppression): two large cells "
    "differ by a small one (README threat model)",
)
def test_two_large_cells_do_not_difference_to_a_small_one(tmp_path: Path) -> None:
    run = _simulate_source(tmp_path, DIFFERENCE, NodePolicy(min_cell_count=5), NODES)
    assert all(not 0 < small < 5 for small in run.value.values()), run.value


# --- what the analysis still chooses: how many messages --------------------------------------

COUNTED = """
import flame

def analyze(data):
    v = data.read_csv()["v"]
    ctx = flame.context()
    for _ in range(int(v[7])):  # empty messages, each within the rules: their number is a record
        ctx.send("tick", {}, to=[ctx.aggregator_id], timeout=5)
    return {"n": flame.dp.count("v", epsilon=0.5)}

def aggregate(results):
    return 0
"""


@pytest.mark.xfail(
    strict=True,
    reason="open: the number (and timing, category, recipients) of messages is the "
    "analysis's choice; each passes the rules (README threat model)",
)
def test_the_number_of_messages_does_not_carry_a_record(tmp_path: Path) -> None:
    from flame.transport.memory import MemoryBroker

    ticks: dict[str, int] = {}

    def watch(envelope: Any) -> bool:
        if envelope.kind == "message" and envelope.category == "tick":
            ticks[envelope.sender] = ticks.get(envelope.sender, 0) + 1
        return True

    folder = tmp_path / "ledger"
    policy = NodePolicy(min_rows=10, epsilon_budget=1.0, ledger_dir=folder)
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(COUNTED))
    functions = load_analysis(path).functions
    flame.simulate(
        functions.analyze,
        functions.aggregate,
        data=NODES,
        isolate=True,
        policy=policy,
        broker=MemoryBroker(on_send=watch),
    )
    assert ticks != dict.fromkeys(NODES, 7), "the record left as a number of messages"


# --- timing: across epochs, and after analyze returned ---------------------------------------

LATE = """
import threading
import time
import flame

def analyze(data, epoch):
    if epoch == 1:
        time.sleep(1.0)  # the late message is heard first, before this epoch reads anything
        return {"n": len(data.read_text("x.csv").split())}
    rows = data.read_text("x.csv").split()[1:3]
    ctx = flame.context()

    def later():
        time.sleep(0.3)  # analyze has returned; the runtime no longer listens to this epoch
        ctx.send("late", {"rows": "|".join(rows)}, timeout=2)

    threading.Thread(target=later, daemon=True).start()
    return {"n": len(rows)}

def aggregate(results):
    import time
    time.sleep(0.6)  # the thread's message is due now
    return None
"""


def test_a_message_sent_after_analyze_returned_is_checked_in_the_epoch_it_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread outliving its epoch sends while the runtime is between epochs: it is heard
    only in the next epoch and checked against that epoch's rows (none read yet, min_rows =
    10): refused, never on the wire."""
    from flame.transport.memory import MemoryBroker

    late: list[Any] = []

    def watch(envelope: Any) -> bool:
        if envelope.kind == "message" and envelope.category == "late":
            late.append(envelope)
        return True

    # a child that lives for the whole run, as on a production node (a pooled child is
    # stopped when its epoch ends, and the late thread with it)
    monkeypatch.setenv("FLAME_SIMULATE_WORKERS", "0")
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(LATE))
    functions = load_analysis(path).functions
    with pytest.raises(RunFailed, match=r"epoch 1.*message refused \(rule: min_rows\)"):
        flame.simulate(
            functions.analyze,
            functions.aggregate,
            data=NODES,
            isolate=True,
            policy=NodePolicy(min_rows=10),
            broker=MemoryBroker(on_send=watch),
            epochs=2,
        )
    assert late == []


STASH = """
import flame

KEPT = []

def analyze(data, epoch):
    if epoch == 0:
        KEPT.extend(data.read_text("x.csv").split()[1:3])  # read now, released next epoch
        return {"n": flame.dp.count("v", epsilon=0.1)}
    return {"rows": "|".join(KEPT), "n": flame.dp.count("v", epsilon=0.1)}

def aggregate(results):
    return None
"""


def test_rows_kept_from_a_refused_epoch_never_leave_in_the_next(tmp_path: Path) -> None:
    """min_rows = 10 on two records; epoch 0 only reads them and releases a DP count, epoch 1
    reads nothing and releases them beside a statistic (judged by the statistic's cover):
    epoch 0 is refused, and the node answers no further epoch."""
    from flame.transport.memory import MemoryBroker

    wire: list[str] = []
    broker = MemoryBroker(on_send=lambda envelope: wire.append(repr(envelope.body)) or True)
    small = {"node-0": {"x.csv": "v\n41\n42\n"}, "node-1": {"x.csv": "v\n7\n8\n"}}
    folder = tmp_path / "ledger"
    policy = NodePolicy(min_rows=10, epsilon_budget=5.0, ledger_dir=folder, dp_clamp=(0, 100))
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(STASH))
    functions = load_analysis(path).functions
    with pytest.raises(RunFailed, match=r"epoch 0.*min_rows"):
        flame.simulate(
            functions.analyze,
            functions.aggregate,
            data=small,
            isolate=True,
            policy=policy,
            broker=broker,
            epochs=2,
        )
    assert not [body for body in wire if "41|42" in body or "7|8" in body]

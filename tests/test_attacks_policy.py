"""Red team: hostile analysis code against the node policy (issue 11), through the same
isolated child and runtime gate a production node uses (`flame.simulate(isolate=True)`).

The markers cross from the child as tagged dicts; the module doc of `flame.markers` promises
"a forged tag can only ask the runtime for more enforcement, never for less". These tests
forge them.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

import flame
from flame.errors import RunFailed
from flame.ledger import BudgetLedger
from flame.loader import load_analysis
from flame.policy import NodePolicy

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
    for secret in ("41|42", "7|8", "141", "107"):
        assert secret not in text, text
        assert not [body for body in wire if secret in body], f"{secret} on the wire"
    assert "withheld" in text, text

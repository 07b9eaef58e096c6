"""Red team audit: threat-model claims that had no test attacking them from the attacker's seat.

Seat throughout: hostile (approved) analysis code on a data holder's node, run through the same
isolated child and runtime a production node uses (`flame.simulate(isolate=True)`), and a
roster member outside the analysis, who may read every retained status (broker ACL). What that
member reads is what the broker records as statuses (`set_status`); what leaves the node for
the aggregator is every envelope on the wire.
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
from flame.privacy.policy import NodePolicy, load_policy

ROWS = "v\nqz4711\nqz4712\n"  # letters too: a timestamp or a uuid cannot hold it by chance
RECORDS = {"node-0": {"x.csv": ROWS}, "node-1": {"x.csv": ROWS}}
SECRET = "qz4711"  # a record of both nodes (a short number matched a status's "time" once)


def _recording_broker(wire: list[str], statuses: list[str]) -> Any:
    """A memory broker keeping every envelope body sent and every status published."""
    from flame.transport.memory import MemoryBroker

    class Recording(MemoryBroker):
        def set_status(self, analysis_id: str, node_id: str, status: dict[str, Any]) -> None:
            statuses.append(json.dumps({k: v for k, v in status.items() if k != "sig"}))
            super().set_status(analysis_id, node_id, status)

    return Recording(on_send=lambda envelope: wire.append(repr(envelope.body)) or True)


def _fail_run(tmp_path: Path, raise_line: str, policy: Any) -> tuple[str, list[str], list[str]]:
    """Run a hostile analysis whose `analyze` reads two records and raises with `raise_line`."""
    source = f"""
        def analyze(data):
            rows = data.read_text("x.csv").split()[1:3]
            {raise_line}

        def aggregate(results):
            return 0
        """
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(source))
    functions = load_analysis(path).functions
    wire: list[str] = []
    statuses: list[str] = []
    with pytest.raises(RunFailed) as failure:
        flame.simulate(
            functions.analyze,
            functions.aggregate,
            data=RECORDS,
            isolate=True,
            policy=policy,
            broker=_recording_broker(wire, statuses),
        )
    return str(failure.value), wire, statuses


# --- retained statuses: every roster member reads them ---------------------------------------

LOWERCASE_CLASS = (
    'raise type("row", (Exception,), {})("patient " + " born ".join(rows) + ", dx C50.9")'
)
SPACED_CLASS = 'raise type("Bad row", (Exception,), {})("patient " + " born ".join(rows))'


@pytest.mark.parametrize("raise_line", [LOWERCASE_CLASS, SPACED_CLASS], ids=["lowercase", "space"])
def test_an_exception_message_never_reaches_a_retained_status(
    tmp_path: Path, raise_line: str
) -> None:
    """CLAIM (threat-model.md, Failure reasons: "Retained statuses and aborts name only the
    failing node, the epoch and the exception type; the message and traceback ... stay in the
    aggregator's log"; "before, a roster member outside the analysis read a patient id from a
    retained status").
    ATTACK (hostile analysis code, default policy): raise an exception whose class name is not
    `Capitalised` (`row`, `Bad row`) with two records in its message; a roster member outside
    the analysis reads every retained status."""
    _, _, statuses = _fail_run(tmp_path, raise_line, NodePolicy())
    assert statuses, "no status was published at all"
    leaked = [s for s in statuses if SECRET in s]
    assert not leaked, leaked[0]


def test_an_exception_class_named_after_a_record_names_no_record_in_a_retained_status(
    tmp_path: Path,
) -> None:
    """CLAIM (threat-model.md, the analysis sandbox row: the analysis cannot "send data-quoting
    error text"; Failure reasons: a roster member outside the analysis reads no patient id from
    a retained status; node policy: what leaves is "which built-in exception type").
    ATTACK (hostile analysis code, default policy): name the exception *class* after two records
    (`Patientqz4711xqz4712`, a valid identifier); a roster member outside the analysis reads every
    retained status. (Under send_tracebacks = false the node already reduces the type to a
    built-in name; the retained status does not.)"""
    raise_line = 'raise type("Patient" + "x".join(rows), (Exception,), {})()'
    _, _, statuses = _fail_run(tmp_path, raise_line, NodePolicy())
    assert statuses, "no status was published at all"
    leaked = [s for s in statuses if SECRET in s]
    assert not leaked, leaked[0]


# --- send_tracebacks defaults to false under every record-protecting rule ---------------------


@pytest.mark.parametrize(
    "rule",
    ["min_rows = 1", "min_cell_count = 5", "epsilon_budget = 1.0"],
    ids=["min_rows", "min_cell_count", "epsilon_budget"],
)
def test_a_record_protecting_policy_file_keeps_the_analysis_error_text_home(
    tmp_path: Path, rule: str
) -> None:
    """CLAIM (threat-model.md, the analysis sandbox, Error text: "Under a policy that sets
    `epsilon_budget`, `min_cell_count` or `min_rows`, `send_tracebacks` defaults to false (the
    analysis's own exception text, e.g. a `KeyError` naming a value, stays on the node)").
    ATTACK (hostile analysis code): the node operator's policy *file* sets only one such rule;
    the analysis raises a KeyError/ValueError naming two records. Nothing on the wire, in a
    status or in the run's failure reason may hold a record. (Before this file only the
    epsilon_budget case was attacked; min_rows and min_cell_count set send_tracebacks
    explicitly in every test.)"""
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(f'{rule}\nledger_dir = "{tmp_path / "ledger"}"\n')
    policy = load_policy(policy_file)
    assert policy.send_tracebacks is False  # the documented default, read from the file
    raise_line = 'raise KeyError("patient " + " born ".join(rows))'
    reason, wire, statuses = _fail_run(tmp_path, raise_line, policy)
    assert "withheld" in reason, reason
    assert SECRET not in reason, reason
    assert not [body for body in wire if SECRET in body], "a record on the wire"
    assert not [s for s in statuses if SECRET in s], "a record in a retained status"


def test_an_explicit_send_tracebacks_true_lets_the_text_leave_control(tmp_path: Path) -> None:
    """Control for the test above: the same run with `send_tracebacks = true` set in the file
    does carry the record to the aggregator, so the assertions above can fail."""
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text("min_rows = 1\nsend_tracebacks = true\n")
    raise_line = 'raise KeyError("patient " + " born ".join(rows))'
    _, wire, _ = _fail_run(tmp_path, raise_line, load_policy(policy_file))
    assert [body for body in wire if SECRET in body]

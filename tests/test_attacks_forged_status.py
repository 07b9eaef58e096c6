"""Red team: the broker operator forges a node's "routine" retained status (issue 21, hole 1).

The operator (a broker user with readwrite on `#`, no identity key) takes node-1's genuine
signed status of the current process and re-publishes it, retained, with one field changed:
`share_aggregate: false` (the aggregator then withheld every aggregate from node-1, whose
`analyze` got `previous=None`: the run ended exit 0 with a wrong result), or another `code`
hash (the run aborted blaming node-1 for unapproved code). The signature no longer matches,
but a routine update of an already verified process used to be taken unchecked.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pytest
from broker import Broker, have_mosquitto
from nodes import Federation, federation_env
from test_attacks_status import Spy

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")

NODES = ["node-0", "node-1"]
ANALYSIS = """
import time

def analyze(data, epoch, previous):
    if epoch == 0:
        time.sleep(4)  # the forgery lands while the nodes compute
    v = [float(x) for x in data.read_text("v.txt").split()]
    base = 0.0 if previous is None else previous["total"]
    return {"x": base + sum(v)}

def aggregate(results):
    return {"total": sum(r["x"] for r in results.values())}
"""


@pytest.mark.parametrize(
    "forged", [{"share_aggregate": False}, {"code": "0" * 64}], ids=["share_aggregate", "code"]
)
def test_a_forged_routine_status_changes_nothing(
    mqtt_broker: Broker, tmp_path: Path, forged: dict[str, object]
) -> None:
    analysis = f"redteam-forged-{time.monotonic_ns()}"
    data = tmp_path / "data"
    for node, text in {"node-0": "1 2 3", "node-1": "10 20"}.items():
        (data / node).mkdir(parents=True)
        (data / node / "v.txt").write_text(text)
    code = tmp_path / "analysis.py"
    code.write_text(textwrap.dedent(ANALYSIS))
    env = federation_env(mqtt_broker, analysis, NODES, epochs=2, epoch_timeout=60)
    fed = Federation(env, code, data, NODES, tmp_path / "logs")
    spy = Spy(mqtt_broker, analysis)
    try:
        fed.start_all()
        genuine = spy.wait_for("node-1", "computing")
        time.sleep(0.5)  # the aggregator has verified node-1's process by now
        spy.replay("node-1", {**genuine, **forged})  # same instance, session, seq: "routine"
        values = fed.finish(timeout=150)
        log = fed.processes["aggregator"].stderr()
    finally:
        spy.close()
        fed.close()
    # Epoch 0: 6 + 30 = 36; epoch 1: (36 + 6) + (36 + 30) = 108. With node-1's aggregate
    # withheld it was (36 + 6) + (0 + 30) = 72.
    assert values["aggregator"] == {"total": 108.0}, json.dumps(values)[:2000]
    assert "without a valid signature" in log or "rejected" in log, log[-3000:]


def test_a_node_that_shares_aggregates_fails_loudly_when_one_is_withheld(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    """A malicious aggregator withholds node-1's aggregates (value None, "withheld"): on main
    node-1 analyzed on with previous=None and the run ended exit 0 with 72 instead of 108."""
    analysis = f"redteam-withheld-{time.monotonic_ns()}"
    data = tmp_path / "data"
    for node, text in {"node-0": "1 2 3", "node-1": "10 20"}.items():
        (data / node).mkdir(parents=True)
        (data / node / "v.txt").write_text(text)
    code = tmp_path / "analysis.py"
    code.write_text(textwrap.dedent(ANALYSIS.replace("time.sleep(4)", "pass")))
    env = federation_env(mqtt_broker, analysis, NODES, epochs=2, epoch_timeout=30)
    fed = Federation(env, code, data, NODES, tmp_path / "logs")
    redteam = Path(__file__).parent / "redteam"
    path = os.pathsep.join(filter(None, [str(redteam), os.environ.get("PYTHONPATH")]))
    try:
        aggregator = fed.start(
            "aggregator", PYTHONPATH=path, REDTEAM_PATCH="withholding_aggregator"
        )
        fed.start("node-0")
        victim = fed.start("node-1")
        code_1 = victim.wait(120)
        aggregator.wait(120)
        assert "REDTEAM patch applied" in aggregator.stderr()
        out = aggregator.stdout()
    finally:
        fed.close()
    assert code_1 != 0, victim.tail()
    assert "withheld the aggregate from this node" in victim.stderr(), victim.tail()
    assert "72" not in out, out[-1000:]

"""Red team: forwarded node logs and a roster member outside the analysis (issue 21, hole 5).

With `forward_logs = true` in node-0's policy, the aggregator used to copy the latest
forwarded lines into its *retained* status, which every roster member may read (the broker
ACL lets every member read every status of the analysis): a member outside the analysis read
a patient row from it after the run. The lines are now kept with the run in the aggregator's
storage and shown by `flame status --logs` to whoever holds the storage credentials.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from broker import Broker, have_mosquitto
from nodes import AGGREGATOR
from redteam_harness import retained_statuses, run_of, status_logs

from flame.transport.mqtt import status_topic

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")

ROW = "patient 4711 born 1957-03-02 diagnosis E11.9"
ANALYSIS = f"""
import logging

def analyze(data):
    v = [float(x) for x in data.read_text("v.txt").split()]
    if data.node_id == "node-0":
        logging.getLogger("analysis").warning("odd row: {ROW}")
    return {{"sum": sum(v)}}

def aggregate(results):
    return {{"sum": sum(r["sum"] for r in results.values())}}
"""


def test_a_member_outside_the_analysis_reads_no_forwarded_log_line(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    analysis = f"redteam-logs-{time.monotonic_ns()}"
    fed = run_of(mqtt_broker, tmp_path, analysis, ANALYSIS, {"node-0": "1 2 3", "node-1": "10 20"})
    policy = tmp_path / "policy.toml"
    policy.write_text("forward_logs = true\n")
    results = tmp_path / "results"
    try:
        fed.start(AGGREGATOR, FLAME_STORAGE__RESULTS_DIR=str(results))
        fed.start("node-0", FLAME_POLICY=str(policy))
        fed.start("node-1")
        assert fed.finish(timeout=120)["aggregator"] == {"sum": 36.0}
        assert ROW in fed.processes[AGGREGATOR].stderr()  # forwarded: the policy allows it
    finally:
        fed.close()
    # node-5: a member of the roster (a broker user with the same ACL), not in this analysis.
    seen = retained_statuses(mqtt_broker, analysis, "node-5")
    assert status_topic(analysis, AGGREGATOR) in seen, sorted(seen)
    for topic, payload in seen.items():
        assert b"4711" not in payload, (topic, json.loads(payload).get("logs"))
    # The operator, with the storage credentials, reads them.
    shown = status_logs(mqtt_broker, fed.env["FLAME_ROSTER"], analysis, results, text=True)
    assert ROW in shown.stdout, shown.stdout[-2000:] + shown.stderr[-2000:]


def test_each_nodes_forwarded_lines_are_kept_within_its_share_and_written_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One node's flood keeps only its own latest lines (its share of the 500) and reaches
    the aggregator's own log at most 200 lines per window; another node's line stays."""
    import logging

    from flame.aggregator import failures
    from flame.aggregator.server import Aggregator
    from flame.analysis.functions import AnalysisFunctions
    from flame.transport.memory import MemoryBroker, MemoryTransport
    from flame.wire.envelope import Envelope

    nodes = ["a", "b", "c", "d", "e"]
    aggregator = Aggregator(
        MemoryTransport(MemoryBroker(), "logs", "aggregator"),
        AnalysisFunctions.of(lambda data: 0, lambda results: 0),
        participants=nodes,
    )

    def forward(node: str, lines: list[str]) -> None:
        body = {"lines": lines}
        envelope = Envelope("logs", node, "aggregator", "message", 0, body, "flame.logs")
        aggregator._note_logs(envelope)

    forward("a", ["disk nearly full"])
    with caplog.at_level(logging.INFO, logger="flame.node_logs"):
        for batch in range(5):
            forward("e", [f"noise {batch}-{i}" for i in range(200)])
    kept = list(aggregator._logs)
    assert "a: disk nearly full" in kept
    assert sum(line.startswith("e: ") for line in kept) == 500 // len(nodes)
    assert kept[-1] == "e: noise 4-199"
    written = [r for r in caplog.records if r.name == "flame.node_logs"]
    assert len(written) == failures._LOG_LINES_PER_WINDOW

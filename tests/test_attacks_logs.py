"""Red team: forwarded node logs and a roster member outside the analysis (issue 21, hole 5).

With `forward_logs = true` in node-0's policy, the aggregator used to copy the latest
forwarded lines into its *retained* status, which every roster member may read (the broker
ACL lets every member read every status of the analysis): a member outside the analysis read
a patient row from it after the run. The lines are now kept with the run in the aggregator's
storage and shown by `flame status --logs` to whoever holds the storage credentials.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker import Broker, have_mosquitto
from nodes import AGGREGATOR, Federation, clean_env, federation_env

from flame.transport.mqtt import status_topic

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")

NODES = ["node-0", "node-1"]
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


def _retained_statuses(broker: Broker, analysis: str, user: str) -> dict[str, bytes]:
    """Every retained status of the analysis, as broker user `user` may read them."""
    seen: dict[str, bytes] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.time_ns()}")
    client.username_pw_set(user, broker.password)
    client.on_message = lambda _c, _u, m: seen.__setitem__(str(m.topic), bytes(m.payload))
    client.connect(broker.host, broker.port, keepalive=30)
    client.subscribe(status_topic(analysis, "+"), qos=1)
    client.loop_start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and status_topic(analysis, AGGREGATOR) not in seen:
        time.sleep(0.1)
    time.sleep(1.0)  # the other retained statuses
    client.loop_stop()
    client.disconnect()
    return seen


def test_a_member_outside_the_analysis_reads_no_forwarded_log_line(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    analysis = f"redteam-logs-{time.monotonic_ns()}"
    data = tmp_path / "data"
    for node, text in {"node-0": "1 2 3", "node-1": "10 20"}.items():
        (data / node).mkdir(parents=True)
        (data / node / "v.txt").write_text(text)
    code = tmp_path / "analysis.py"
    code.write_text(textwrap.dedent(ANALYSIS))
    policy = tmp_path / "policy.toml"
    policy.write_text("forward_logs = true\n")
    results = tmp_path / "results"
    env = federation_env(mqtt_broker, analysis, NODES)
    fed = Federation(env, code, data, NODES, tmp_path / "logs")
    try:
        fed.start(AGGREGATOR, FLAME_STORAGE__RESULTS_DIR=str(results))
        fed.start("node-0", FLAME_POLICY=str(policy))
        fed.start("node-1")
        assert fed.finish(timeout=120)["aggregator"] == {"sum": 36.0}
        assert ROW in fed.processes[AGGREGATOR].stderr()  # forwarded: the policy allows it
    finally:
        fed.close()
    # node-5: a member of the roster (a broker user with the same ACL), not in this analysis.
    seen = _retained_statuses(mqtt_broker, analysis, "node-5")
    assert status_topic(analysis, AGGREGATOR) in seen, sorted(seen)
    for topic, payload in seen.items():
        assert b"4711" not in payload, (topic, json.loads(payload).get("logs"))
    # The operator, with the storage credentials, reads them.
    operator = {
        **clean_env(),
        "FLAME_BROKER__URL": mqtt_broker.url,
        "FLAME_BROKER__USERNAME": "admin",
        "FLAME_BROKER__TOKEN": mqtt_broker.password,
        "FLAME_ROSTER": env["FLAME_ROSTER"],
        "FLAME_STORAGE__RESULTS_DIR": str(results),
    }
    shown = subprocess.run(
        [sys.executable, "-m", "flame", "status", analysis, "--logs"],
        env=operator,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ROW in shown.stdout, shown.stdout[-2000:] + shown.stderr[-2000:]

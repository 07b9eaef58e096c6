"""Set-up the red-team tests share: a run of real `flame run` processes over per-node files,
the retained statuses a broker user can read, and the operator's `flame status --logs`.

The tests assert; these only build what they attack, so one change of the set-up (a new
setting every run needs) reaches every red team at once.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker import Broker
from nodes import AGGREGATOR, Federation, clean_env, federation_env

__all__ = ["node_files", "one_node_federation", "retained_statuses", "run_of", "status_logs"]


def node_files(folder: Path, values: Mapping[str, str], name: str = "v.txt") -> Path:
    """folder/data/<node>/<name> holding each node's text; returns the data folder."""
    data = folder / "data"
    for node, text in values.items():
        (data / node).mkdir(parents=True, exist_ok=True)
        (data / node / name).write_text(text)
    return data


def run_of(
    broker: Broker,
    folder: Path,
    analysis: str,
    code: str,
    values: Mapping[str, str],
    **env: Any,
) -> Federation:
    """The run `analysis` of `code` (dedented, folder/analysis.py) by the nodes of `values`
    (each its v.txt), not started; logs in folder/logs. `env`: federation_env's keywords."""
    data = node_files(folder, values)
    path = folder / "analysis.py"
    path.write_text(textwrap.dedent(code))
    nodes = list(values)
    return Federation(
        federation_env(broker, analysis, nodes, **env), path, data, nodes, folder / "logs"
    )


def one_node_federation(
    broker: Broker,
    folder: Path,
    analysis: Path,
    code: str,
    analysis_id: str,
    *,
    node: str,
    csv: str = "v\n1\n",
    epoch_timeout: float,
) -> Federation:
    """An aggregator and one signed analysis node running `code` (written to `analysis`,
    approved by its hash) on folder/data/<node>/x.csv; not started, logs in folder/logs."""
    from flame.analysis.code_hash import analysis_code_hash

    analysis.parent.mkdir(parents=True, exist_ok=True)
    analysis.write_text(code)
    data = node_files(folder, {node: csv}, "x.csv")
    env = federation_env(
        broker,
        analysis_id,
        [node],
        presence_timeout=20,
        epoch_timeout=epoch_timeout,
        FLAME_APPROVED_CODE=analysis_code_hash(analysis),
    )
    return Federation(env, analysis, data, [node], folder / "logs")


def retained_statuses(
    broker: Broker, analysis: str, user: str, topic: str = "+"
) -> dict[str, bytes]:
    """Every retained message under flame/ANALYSIS/<topic>/status, as broker user `user`
    may read them: waits for the aggregator's (10 s at most), then 1 s for the others."""
    import paho.mqtt.client as mqtt

    from flame.transport.mqtt import status_topic

    seen: dict[str, bytes] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.time_ns()}")
    client.username_pw_set(user, broker.password)
    client.on_message = lambda _c, _u, m: seen.__setitem__(str(m.topic), bytes(m.payload))
    client.connect(broker.host, broker.port, keepalive=30)
    client.subscribe(status_topic(analysis, topic), qos=1)
    client.loop_start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and status_topic(analysis, AGGREGATOR) not in seen:
        time.sleep(0.1)
    time.sleep(1.0)  # the other retained statuses
    client.loop_stop()
    client.disconnect()
    return seen


def status_logs(
    broker: Broker, roster: str, analysis: str, results: Path, *, text: bool
) -> subprocess.CompletedProcess[Any]:
    """`flame status ANALYSIS --logs` as the broker's operator holding the results folder."""
    operator = {
        **clean_env(),
        "FLAME_BROKER__URL": broker.url,
        "FLAME_BROKER__USERNAME": "admin",
        "FLAME_BROKER__TOKEN": broker.password,
        "FLAME_ROSTER": roster,
        "FLAME_STORAGE__RESULTS_DIR": str(results),
    }
    return subprocess.run(
        [sys.executable, "-m", "flame", "status", analysis, "--logs"],
        env=operator,
        capture_output=True,
        text=text,
        timeout=60,
    )

"""FLAME_SECURE__SCHEME=masking with `flame run`: three analysis nodes and the aggregator as
real processes over Mosquitto, every message signed with the roster identities."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from broker import Broker, have_mosquitto
from nodes import AGGREGATOR, Federation, federation_env

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")

NODES = ["node-0", "node-1", "node-2"]
VALUES = {"node-0": "1.5 2.25", "node-1": "-3.125", "node-2": "10 7 0.5"}

ANALYSIS = """
import numpy as np
import flame

def analyze(data):
    v = np.array([float(x) for x in data.read_text("v.txt").split()])
    moments = flame.secure([v.sum(), (v**2).sum()])
    return {"n": flame.secure(len(v), precision=0), "moments": moments}

def aggregate(results):
    return {"n": results.secure["n"], "moments": results.secure["moments"].tolist(),
            "who": results.contributors["moments"]}
"""


def test_a_masked_run_over_mosquitto_gives_the_pooled_sums(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for node, text in VALUES.items():
        (data / node).mkdir(parents=True)
        (data / node / "v.txt").write_text(text)
    code = tmp_path / "analysis.py"
    code.write_text(textwrap.dedent(ANALYSIS))
    with Broker() as broker:
        env = federation_env(
            broker,
            "masked-run",
            NODES,
            epochs=2,
            presence_timeout=60,
            epoch_timeout=60,
            FLAME_SECURE__ENABLED="true",
            FLAME_SECURE__SCHEME="masking",
        )
        federation = Federation(env, code, data, NODES, tmp_path / "logs")
        try:
            federation.start_all()
            values = federation.finish(timeout=150)
        finally:
            for process in federation.processes.values():
                process.kill()
    pooled = [float(x) for text in VALUES.values() for x in text.split()]
    final = values[AGGREGATOR]
    assert final["n"] == len(pooled)
    assert final["who"] == NODES
    assert final["moments"] == pytest.approx(
        [sum(pooled), sum(x * x for x in pooled)], abs=6 * 2.0**-17
    )
    assert all(values[node] == final for node in NODES)

"""Red team: single-key secure aggregation over a real Mosquitto (issue 21, holes 2-4).

Every analysis node holds the one Paillier private key. Attackers: the broker's operator
(a broker user with readwrite on `#`), a malicious aggregator, a lying reporter: each a
patched `flame run` process (tests/redteam/redteam_patches.py) among unchanged ones.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, have_mosquitto
from nodes import AGGREGATOR, Federation, NodeProcess, federation_env

from flame.protocols.paillier import write_keypair

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")

NODES = ["node-0", "node-1", "node-2"]  # node-0, the first, is the reporter
VALUES = {"node-0": "1 2 3", "node-1": "10 20", "node-2": "100"}  # sums 6, 30, 100
REDTEAM = Path(__file__).parent / "redteam"
ANALYSIS = """
import flame

def analyze(data, epoch, previous):
    v = [float(x) for x in data.read_text("v.txt").split()]
    return {"total": flame.secure(sum(v) + 1000 * epoch)}

def aggregate(results):
    return {"total": results.secure["total"], "who": results.contributors["total"]}
"""


@pytest.fixture(scope="module")
def paillier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_keypair(tmp_path_factory.mktemp("keys"), 2048)


def _federation(
    broker: Broker, folder: Path, keys: tuple[Path, Path], **extra: str
) -> tuple[Federation, dict[str, str]]:
    data = folder / "data"
    for node, text in VALUES.items():
        (data / node).mkdir(parents=True)
        (data / node / "v.txt").write_text(text)
    code = folder / "analysis.py"
    code.write_text(textwrap.dedent(ANALYSIS))
    settings = {
        "FLAME_SECURE__ENABLED": "true",
        "FLAME_SECURE__PUBLIC_KEY_FILE": str(keys[0]),
        "FLAME_SECURE__MIN_CONTRIBUTORS": "3",
        **extra,
    }
    analysis = f"redteam-single-key-{time.monotonic_ns()}"
    env = federation_env(broker, analysis, NODES, epoch_timeout=15, **settings)
    private = {"FLAME_SECURE__PRIVATE_KEY_FILE": str(keys[1])}
    return Federation(env, code, data, NODES, folder / "logs"), private


def _patched(
    fed: Federation, node: str, patch: str, private: dict[str, str], **extra: str
) -> NodeProcess:
    path = os.pathsep.join(filter(None, [str(REDTEAM), os.environ.get("PYTHONPATH")]))
    return fed.start(node, PYTHONPATH=path, REDTEAM_PATCH=patch, **private, **extra)


def _release(processes: list[NodeProcess]) -> None:
    for process in processes:
        if process.returncode is None:
            process.signal(signal.SIGCONT)


def test_a_lying_reporter_with_confirmers_held_never_ends_the_run_with_its_sum(
    mqtt_broker: Broker, tmp_path: Path, paillier: tuple[Path, Path]
) -> None:
    """Hole 4: on main the aggregator waited out the confirmations, logged one WARNING and
    ended exit 0 with total + 100,000."""
    fed, private = _federation(mqtt_broker, tmp_path, paillier)
    try:
        aggregator = fed.start(AGGREGATOR)
        held = [fed.start(node, **private) for node in NODES[1:]]
        liar = _patched(
            fed, "node-0", "lying_reporter", private,
            REDTEAM_HOLD=",".join(str(p.pid) for p in held),
        )  # fmt: skip
        code = aggregator.wait(120)
        assert "REDTEAM patch applied" in liar.stderr()
        out, err = aggregator.stdout(), aggregator.stderr()
    finally:
        _release(list(fed.processes.values()))
        fed.close()
    assert "100136" not in out, out[-2000:]
    assert code != 0, f"exit {code} with {out[-500:]}"
    assert "confirmed the secure sum" in err, err[-3000:]


def _value(process: NodeProcess) -> Any:
    return json.loads(process.stdout().strip().splitlines()[-1])

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


QUORUM_ANALYSIS = """
import time
import flame

def analyze(data, epoch, previous):
    if epoch == 1 and data.node_id == "node-2":
        time.sleep(40)  # held back (by the operator): the quorum goes on without it
    v = [float(x) for x in data.read_text("v.txt").split()]
    return {"total": flame.secure(sum(v))}

def aggregate(results):
    return {"total": results.secure["total"], "who": results.contributors["total"]}
"""


def test_a_quorum_epoch_over_another_set_is_not_decrypted(
    mqtt_broker: Broker, tmp_path: Path, paillier: tuple[Path, Path]
) -> None:
    """Hole 2: epoch 0 decrypted the sum over {0, 1, 2}, epoch 1 (node-2 held) over {0, 1}:
    the difference is node-2's value. On main everyone exited 0. The aggregator here has
    lifted its own guard; the nodes keep theirs."""
    fed, private = _federation(
        mqtt_broker, tmp_path, paillier,
        FLAME_QUORUM="2", FLAME_EPOCHS="2", FLAME_SECURE__MIN_CONTRIBUTORS="2",
    )  # fmt: skip
    fed.analysis.write_text(textwrap.dedent(QUORUM_ANALYSIS))
    try:
        aggregator = _patched(fed, AGGREGATOR, "aggregator_without_guard", {})
        for node in NODES:
            fed.start(node, **private)
        code = aggregator.wait(120)
        out, err = aggregator.stdout(), aggregator.stderr()
        assert "REDTEAM patch applied" in err
    finally:
        fed.close()
    assert code != 0, f"exit {code} with {out[-500:]}"
    assert "refused to endorse" in err or "refused to decrypt" in err, err[-3000:]
    assert "FLAME_SECURE__ALLOW_CHANGING_CONTRIBUTORS" in err, err[-3000:]
    assert '"total": 36.0' not in out  # the {0, 1} sum never left a node


def test_a_lone_ciphertext_relabelled_as_a_sum_is_not_decrypted(
    mqtt_broker: Broker, tmp_path: Path, paillier: tuple[Path, Path]
) -> None:
    """Hole 3: node-1's lone ciphertext, relabelled as a 2-contributor sum, was decrypted by
    node-0 on main (its exact value, 30). Decrypters now re-add signed contributions."""
    fed, private = _federation(mqtt_broker, tmp_path, paillier, FLAME_SECURE__MIN_CONTRIBUTORS="2")
    out_file = tmp_path / "learned.json"
    try:
        aggregator = _patched(
            fed, AGGREGATOR, "relabelling_aggregator", {}, REDTEAM_OUT=str(out_file)
        )
        for node in NODES:
            fed.start(node, **private)
        code = aggregator.wait(120)
        err = aggregator.stderr()
        assert "REDTEAM patch applied" in err
    finally:
        fed.close()
    learned = json.loads(out_file.read_text())
    for attempt, answer in learned.items():
        assert answer.startswith("refused:"), (attempt, answer)
        assert "30.0" not in answer and "30." not in answer
    assert "decrypts only sums it re-adds" in learned["sum"], learned
    assert code == 0, err[-3000:]  # the honest sum that followed was still decrypted
    assert json.loads(aggregator.stdout().strip().splitlines()[-1])["total"] == 136.0


def test_two_sets_of_one_field_are_never_both_decrypted(
    mqtt_broker: Broker, tmp_path: Path, paillier: tuple[Path, Path]
) -> None:
    """A malicious aggregator asks node-1 for the sum over {node-1, node-2}, then node-0 (its
    ledger still empty) for the sum over all three: their difference is node-0's value. Each
    node's own guard cannot see this; every contributor endorsing the set first does. On
    main, and on this branch before the endorsement round, both sums were decrypted."""
    fed, private = _federation(mqtt_broker, tmp_path, paillier, FLAME_SECURE__MIN_CONTRIBUTORS="2")
    out_file = tmp_path / "learned.json"
    try:
        aggregator = _patched(
            fed, AGGREGATOR, "splitting_aggregator", {}, REDTEAM_OUT=str(out_file)
        )
        for node in NODES:
            fed.start(node, **private)
        aggregator.wait(120)
        assert "REDTEAM patch applied" in aggregator.stderr()
    finally:
        fed.close()
    learned = json.loads(out_file.read_text())
    decrypted = [name for name, answer in learned.items() if not answer.startswith("refused")]
    assert len(decrypted) <= 1, learned
    assert "endorse" in learned["big"], learned

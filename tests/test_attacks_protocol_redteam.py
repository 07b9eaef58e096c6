"""Red team of the `protocol` branch (issue 21) over a real Mosquitto with the generated ACL.

Seats: the broker's operator (a broker user with readwrite on `#`), a malicious aggregator
(holds the aggregator's identity key: a patched `flame run` process), one colluding analysis
node (its identity key and, in single-key mode, the private key). Patches live in
tests/redteam_protocol/rt_protocol_patches.py and say on stderr that they were applied.

Each test asserts the SAFE outcome; an attack that still works is a strict xfail whose reason
says what breaks.
"""

from __future__ import annotations

import contextlib
import json
import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import Broker, have_mosquitto
from nodes import AGGREGATOR, Federation, NodeProcess
from redteam_harness import retained_statuses, run_of, status_logs

from flame.protocols.paillier import write_keypair

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")

NODES = ["node-0", "node-1", "node-2"]
VALUES = {"node-0": "1 2 3", "node-1": "10 20", "node-2": "100"}  # sums 6, 30, 100
TWO_VALUES = {"node-0": "1 2 3", "node-1": "10 20"}  # sums 6, 30
PATCH_DIR = Path(__file__).parent / "redteam_protocol"
SECURE_ANALYSIS = """
import flame

def analyze(data, epoch, previous):
    v = [float(x) for x in data.read_text("v.txt").split()]
    return {"total": flame.secure(sum(v))}

def aggregate(results):
    return {"total": results.secure["total"], "who": results.contributors["total"]}
"""


@pytest.fixture(scope="module")
def paillier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_keypair(tmp_path_factory.mktemp("keys"), 2048)


def _single_key(
    broker: Broker, folder: Path, keys: tuple[Path, Path], **extra: str
) -> tuple[Federation, dict[str, str]]:
    settings = {
        "FLAME_SECURE__ENABLED": "true",
        "FLAME_SECURE__PUBLIC_KEY_FILE": str(keys[0]),
        "FLAME_SECURE__MIN_CONTRIBUTORS": "2",
        **extra,
    }
    analysis = f"rt-protocol-{time.monotonic_ns()}"
    private = {"FLAME_SECURE__PRIVATE_KEY_FILE": str(keys[1])}
    return run_of(
        broker, folder, analysis, SECURE_ANALYSIS, VALUES, epoch_timeout=20, **settings
    ), private


@contextlib.contextmanager
def _precondition() -> Iterator[None]:
    """A failed set-up step of a strict-xfail test is an error, not the expected failure
    (xfails here are raises=AssertionError: only the safe-outcome assertion may fail)."""
    try:
        yield
    except AssertionError as exc:
        raise RuntimeError(f"precondition failed: {exc}") from None


def _exit_code(process: NodeProcess, timeout: float) -> int | None:
    """The exit code, or None if the process is still running after `timeout` s."""
    try:
        return process.wait(timeout)
    except AssertionError:
        return None


def _patched(fed: Federation, node: str, patch: str, out: Path, **extra: str) -> NodeProcess:
    path = os.pathsep.join(filter(None, [str(PATCH_DIR), os.environ.get("PYTHONPATH")]))
    return fed.start(
        node, PYTHONPATH=path, RT_PROTOCOL_PATCH=patch, RT_PROTOCOL_OUT=str(out), **extra
    )


# --- single key: two decrypters, two contributor sets, one epoch -----------------------------


def test_single_key_two_decrypters_are_not_asked_for_two_sets_of_one_field(
    mqtt_broker: Broker, tmp_path: Path, paillier: tuple[Path, Path]
) -> None:
    """Malicious aggregator, no key, no colluder. Each single-key decrypter's differencing
    guard (flame.secure.single_key.SingleKeyDecrypter._guard) only knew what *it* decrypted:
    before 3481dd5 node-0 decrypted sum{0,1} = 36 and node-2 sum{0,1,2} = 136 in the same
    epoch and field (node-2's value 100 by difference). Held since 3481dd5: every contributor
    endorses one set per (epoch, field) (flame.secure.unanimous). Safe outcome: at most one
    of the two differing sums is ever decrypted."""
    fed, private = _single_key(mqtt_broker, tmp_path, paillier)
    out = tmp_path / "learned.json"
    try:
        aggregator = _patched(fed, AGGREGATOR, "split_decrypters", out)
        for node in NODES:
            fed.start(node, **private)
        aggregator.wait(120)
        assert "RT_PROTOCOL patch applied" in aggregator.stderr()
    finally:
        fed.close()
    learned = json.loads(out.read_text())
    decrypted = {k: v for k, v in learned.items() if isinstance(v, list)}
    assert len(decrypted) < 2, f"two sets decrypted: {learned} (difference = node-2's value)"
    assert len(decrypted) == 1, learned  # the first set is endorsed and decrypted as usual
    refused = [v for v in learned.values() if isinstance(v, str)]
    assert any("endorse" in v for v in refused), learned  # refused by the endorsement round


# --- single key: a passive decrypter reads every node's value --------------------------------


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="accepted: single-key decryption requests carry every node's lone signed "
    "ciphertext to each decrypter, which holds the private key, so an honest-but-curious key "
    "holder reads them all: the price of re-adding signed contributions in single-key mode; "
    "threshold keys are the production mode (docs/threat-model.md)",
)
def test_single_key_a_curious_decrypter_learns_no_other_nodes_value(
    mqtt_broker: Broker, tmp_path: Path, paillier: tuple[Path, Path]
) -> None:
    """Colluding (here: merely curious) node-0, the reporter, answers honestly but decrypts
    what the request hands it. README ("One analysis node holds the private key and
    therefore must never see another node's ciphertext; the star topology sends ciphertexts
    only to the aggregator") promises it learns only the sum; since a5c5cfe the request
    holds node-1's and node-2's own ciphertexts. Safe outcome: node-0 learns neither 30 nor
    100, only the sum 136."""
    fed, private = _single_key(mqtt_broker, tmp_path, paillier)
    out = tmp_path / "learned.json"
    try:
        aggregator = fed.start(AGGREGATOR)
        curious = _patched(fed, "node-0", "curious_decrypter", out, **private)
        for node in NODES[1:]:
            fed.start(node, **private)
        with _precondition():
            values = fed.finish(timeout=150)
        with _precondition():
            assert "RT_PROTOCOL patch applied" in curious.stderr()
    finally:
        fed.close()
    with _precondition():
        assert values[AGGREGATOR]["total"] == 136.0  # the run itself is honest and right
    del aggregator
    learned = json.loads(out.read_text()) if out.exists() else {}
    exact = {k: v for k, v in learned.items() if isinstance(v, list)}
    assert not exact, f"node-0 decrypted other nodes' own values: {exact}"


# --- the aggregator's retained status and a roster member outside the analysis --------------

ROW = "patient 4711 born 1957-03-02 diagnosis E11.9"
FAILING_ANALYSIS = f"""
def analyze(data):
    v = [float(x) for x in data.read_text("v.txt").split()]
    if data.node_id == "node-1":
        raise ValueError("odd row: {ROW}")
    return {{"sum": sum(v)}}

def aggregate(results):
    return {{"sum": sum(r["sum"] for r in results.values())}}
"""


@pytest.mark.parametrize(
    "send_tracebacks",
    [pytest.param(True, id="default"), pytest.param(False, id="no_tb")],
)
def test_a_member_outside_the_analysis_reads_no_node_traceback(
    mqtt_broker: Broker, tmp_path: Path, send_tracebacks: bool
) -> None:
    """Issue 21 hole 5 moved forwarded log lines out of the retained status, but
    Aggregator._abort (src/flame/aggregator/failures.py) still puts the failing node's
    `traceback` (and the reason) into the retained `failed` status. The default policy
    (send_tracebacks = true) lets the traceback leave the node *for the aggregator*; the ACL
    lets every roster member read every status. Safe outcome: node-5, a roster member
    outside the analysis, reads no byte of the row."""
    analysis = f"rt-protocol-tb-{time.monotonic_ns()}"
    nodes = ["node-0", "node-1"]
    fed = run_of(mqtt_broker, tmp_path, analysis, FAILING_ANALYSIS, TWO_VALUES)
    try:
        aggregator = fed.start(AGGREGATOR)
        policy = tmp_path / "policy.toml"
        policy.write_text(f"send_tracebacks = {str(send_tracebacks).lower()}\n")
        for node in nodes:
            fed.start(node, FLAME_POLICY=str(policy))
        with _precondition():
            assert aggregator.wait(120) != 0
    finally:
        fed.close()
    seen = retained_statuses(mqtt_broker, analysis, "node-5")
    with _precondition():
        assert seen, "node-5 read no status at all"
    leaked = {
        topic: [k for k, v in json.loads(payload).items() if "4711" in json.dumps(v)]
        for topic, payload in seen.items()
    }
    leaked = {topic: keys for topic, keys in leaked.items() if keys}
    assert not leaked, leaked


# --- a malicious aggregator equivocates ------------------------------------------------------

EPOCHS_ANALYSIS = """
def analyze(data, epoch, previous):
    v = [float(x) for x in data.read_text("v.txt").split()]
    base = 0.0 if previous is None else previous["total"]
    return {"x": base + sum(v)}

def aggregate(results):
    return {"total": sum(r["x"] for r in results.values())}
"""


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="accepted: the aggregator is trusted to compute and distribute the aggregate "
    "honestly; an equivocating aggregator gives node-1 another aggregate and final result "
    "than node-0 and node-2; every process exits 0, nobody notices (docs/threat-model.md)",
)
def test_an_equivocating_aggregator_is_noticed(mqtt_broker: Broker, tmp_path: Path) -> None:
    """Nodes never compare the aggregates they were sent (no signed digest of the epoch's
    aggregate in the statuses, no cross-check): node-1 ends exit 0 with a final value that
    differs from everyone else's. Safe outcome: no two processes end exit 0 with different
    final results."""
    analysis = f"rt-protocol-eq-{time.monotonic_ns()}"
    fed = run_of(mqtt_broker, tmp_path, analysis, EPOCHS_ANALYSIS, VALUES, epochs=2)
    out = tmp_path / "unused.json"
    try:
        aggregator = _patched(fed, AGGREGATOR, "equivocating_aggregator", out)
        for node in NODES:
            fed.start(node)
        with _precondition():
            codes = {name: p.wait(120) for name, p in fed.processes.items()}
        with _precondition():
            assert "RT_PROTOCOL patch applied" in aggregator.stderr()
        finals = {
            name: json.dumps(p.value(), sort_keys=True)
            for name, p in fed.processes.items()
            if codes[name] == 0
        }
    finally:
        fed.close()
    assert len(set(finals.values())) <= 1, finals


# --- the broker operator moves genuine statuses between nodes and analyses --------------------

SLOW_EPOCHS_ANALYSIS = """
import time

def analyze(data, epoch, previous):
    if epoch == 0:
        time.sleep(4)  # the moved statuses land while the nodes compute
    v = [float(x) for x in data.read_text("v.txt").split()]
    base = 0.0 if previous is None else previous["total"]
    return {"x": base + sum(v)}

def aggregate(results):
    return {"total": sum(r["x"] for r in results.values())}
"""


def test_a_genuine_status_moved_to_another_node_changes_nothing(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    """The digest cache (Transport._trusted_status) is keyed by node + payload, and the
    signature binds analysis and node: node-1's genuine status (already verified and cached
    at the aggregator) re-published, retained, as node-2's and node-0's must not be taken
    for theirs (it would fake a second process or another state of theirs). Held."""
    from test_attacks_status import Spy

    analysis = f"rt-protocol-move-{time.monotonic_ns()}"
    fed = run_of(mqtt_broker, tmp_path, analysis, SLOW_EPOCHS_ANALYSIS, VALUES, epochs=2)
    spy = Spy(mqtt_broker, analysis)
    try:
        fed.start_all()
        genuine = spy.wait_for("node-1", "computing")
        time.sleep(0.5)  # verified (and cached) at the aggregator by now
        spy.replay("node-2", genuine)
        spy.replay("node-0", {**genuine, "state": "done", "online": False})  # re-signed by nobody
        values = fed.finish(timeout=150)
        log = fed.processes[AGGREGATOR].stderr()
    finally:
        spy.close()
        fed.close()
    # epoch 0: 6 + 30 + 100 = 136; epoch 1: 3 * 136 + 136 = 544
    assert values[AGGREGATOR] == {"total": 544.0}, values
    assert "claiming to be from 'node-2': status without a valid signature" in log, log[-3000:]
    assert "claiming to be from 'node-0': status without a valid signature" in log, log[-3000:]


def test_a_status_verified_for_one_analysis_or_node_is_refused_for_another(tmp_path: Path) -> None:
    """The same check without a broker, for what a live run cannot show cheaply: a status
    accepted (and cached) by one transport is refused as another node's, and by a transport
    of another analysis id (same roster, same node ids); a byte changed after caching is
    verified again. Held."""
    from nodes import identities_env

    from flame.identity import Authenticator, Identity, Roster
    from flame.transport.base import Transport

    class Receiver(Transport):  # only the status check of the base class is used
        connect = close = send = announce = watch = lambda self, *a, **k: None  # type: ignore
        receive = lambda self, timeout: None  # type: ignore  # noqa: E731

    ids = identities_env(["node-1", "node-2"])
    roster = Roster.load(Path(ids["FLAME_ROSTER"]))
    keys = Path(ids["TEST_FLAME_IDENTITY_DIR"])

    def auth(node: str) -> Authenticator:
        return Authenticator(Identity.load(node, keys / f"{node}.key"), roster)

    now = time.time()
    status = auth("node-1").sign_status(
        "analysis-a", {"state": "computing", "instance": "i1", "since": now, "seq": 1, "at": now}
    )
    payload = json.dumps(status, separators=(",", ":")).encode()
    same = Receiver("analysis-a", AGGREGATOR, auth=auth(AGGREGATOR))
    assert same.status_envelope("node-1", payload) is not None  # genuine: accepted, cached
    assert same.status_envelope("node-2", payload) is None  # moved to another node
    other = Receiver("analysis-b", AGGREGATOR, auth=auth(AGGREGATOR))
    assert other.status_envelope("node-1", payload) is None  # moved to another analysis
    changed = payload.replace(b'"computing"', b'"done"')
    assert same.status_envelope("node-1", changed) is None  # a changed byte: verified again


# --- a lying reporter and the confirmers' sample ---------------------------------------------


def test_a_lying_reporter_with_all_but_one_confirmer_held_is_caught() -> None:
    """The aggregator's real decision logic (SecureSummer._decrypt and
    _enough_confirmations) with the real confirmer check (verify_reported_sum at the fraction
    the aggregator sends); only the transport is simulated: the reporter (colluding node)
    adds 1.0 to one value, the broker's operator holds 8 of the 9 confirmers, the one left
    answers honestly. README: 'a single altered ciphertext escapes with probability about
    e^-3 ~ 5%' (every confirmer present); issue 21: 'a lying reporter with confirmers held
    never yields exit 0'. Safe outcome: the lie gets through in at most ~5% of the epochs."""
    import numpy as np

    from flame.errors import RunFailed
    from flame.protocols.paillier import (
        EncryptedVector,
        SecureSumSpec,
        decrypt_vector,
        encrypt_vector,
        generate_keypair,
        verify_reported_sum,
    )
    from flame.secure.fields import SecureKeys

    try:
        from flame.secure.summer import SecureSummer
    except ImportError:  # before cc33ac9
        from flame.secure.fields import SecureSummer  # type: ignore[attr-defined,no-redef]
    from flame.wire.envelope import Sealed

    public, private = generate_keypair(512, allow_insecure=True)
    spec = SecureSumSpec(precision=16, bound=1000.0, max_nodes=16)
    nodes = [f"node-{i}" for i in range(10)]
    rng = np.random.default_rng(7)
    vectors = [encrypt_vector(rng.uniform(-9, 9, 300), private, spec) for _ in nodes]
    total = EncryptedVector.sum(vectors)
    with _precondition():
        assert len(total.ciphertexts) >= 20
    honest = decrypt_vector(total, private, spec, min_contributors=2)
    lie = honest.copy()
    lie[0] += 1.0  # one value, so one ciphertext, is misreported
    keys = SecureKeys(public, None, spec, min_contributors=2)
    summer = SecureSummer(keys, timeout=1.0)

    def ask(epoch: int, asked: list[str], body: dict, *, required: bool = True) -> dict:
        if "reported" not in body:
            return {asked[0]: {"sums": {"total": lie}}}  # the colluding reporter
        free = asked[0]  # the one confirmer the operator lets through
        checked = verify_reported_sum(  # raises on a mismatch: the run stops (RunFailed)
            total,
            private,
            spec,
            body["reported"]["total"],
            min_contributors=2,
            fraction=body["fraction"],
        )
        return {free: {"confirmed": checked}}

    summer._ask = ask  # type: ignore[method-assign]
    sums = {"total": Sealed("paillier", total.to_bytes())}
    escaped = 0
    trials = 120
    for epoch in range(trials):
        try:
            released = summer._decrypt(epoch, sums, {"total": nodes})
        except Exception as exc:  # SumMismatchError from the confirmer, or RunFailed
            with _precondition():
                assert isinstance(exc, (RunFailed, ValueError)) or "differs" in str(exc), exc
            continue
        with _precondition():
            assert np.array_equal(released["total"], lie)
        escaped += 1
    assert escaped <= 0.10 * trials, f"the lie was released in {escaped} of {trials} epochs"


# --- claim check: the store every node shares is the aggregator's run store ------------------


def _shared_store_federation(
    broker: Broker, folder: Path, s3: object, bucket: str, analysis: str, **extra: str
) -> Federation:
    storage = s3.settings(bucket=bucket)  # type: ignore[attr-defined]
    return run_of(
        broker,
        folder,
        analysis,
        LOGGING_ANALYSIS,
        VALUES,
        storage=storage,
        FLAME_STORAGE__CLAIM_CHECK="true",
        **extra,
    )


LOGGING_ANALYSIS = f"""
import logging

def analyze(data):
    v = [float(x) for x in data.read_text("v.txt").split()]
    if data.node_id == "node-0":
        logging.getLogger("analysis").warning("odd row: {ROW}")
    return {{"total": sum(v)}}

def aggregate(results):
    return {{"total": sum(r["total"] for r in results.values())}}
"""


def _colluder_store(s3: object, bucket: str) -> object:
    """node-1's view of the claim-check store: its own FLAME_STORAGE__* settings."""
    from flame.clients.minio_client import MinioStore
    from flame.config import StorageSettings

    return MinioStore.from_settings(StorageSettings(**s3.settings(bucket=bucket)))  # type: ignore[attr-defined]


def test_a_node_with_the_shared_store_cannot_plant_the_final_result(
    mqtt_broker: Broker, tmp_path: Path, s3_server: object, s3_bucket: str
) -> None:
    """Colluding node-1, before the run, with the storage credentials every node has for
    the claim check (README: 'a storage every node shares'), writes a manifest and a final
    result for the analysis id. RunStore.load_final (src/flame/aggregator/run_store.py)
    takes them as a finished run: the aggregator announces 999 and nobody computes. Safe
    outcome: no process ends exit 0 with 999."""
    from flame.clients.object_store import AnalysisLayout
    from flame.wire.envelope import pack

    analysis = f"rt-protocol-plant-{time.monotonic_ns()}"
    fed = _shared_store_federation(mqtt_broker, tmp_path, s3_server, s3_bucket, analysis)
    store = _colluder_store(s3_server, s3_bucket)
    store.ensure_bucket()  # type: ignore[attr-defined]
    layout = AnalysisLayout(analysis)
    store.put_bytes(layout.final_result(), pack({"total": 999.0}))  # type: ignore[attr-defined]
    manifest = {"converged": True, "epochs": 1, "history": [], "result": {"key": "x"}}
    store.put_json(layout.manifest(), manifest)  # type: ignore[attr-defined]
    from test_attacks_status import Spy

    spy = Spy(mqtt_broker, analysis)
    try:
        for node in NODES:  # the nodes first, so the aggregator's announcement reaches them
            fed.start(node)
        with _precondition():
            for node in NODES:
                spy.wait_for(node, "waiting")
        fed.start(AGGREGATOR)
        codes = {name: _exit_code(p, 120) for name, p in fed.processes.items()}
        finals = {name: p.value() for name, p in fed.processes.items() if codes[name] == 0}
    finally:
        spy.close()
        fed.close()
    planted = {name: v for name, v in finals.items() if v == {"total": 999.0}}
    assert not planted, f"exit 0 with the planted result: {planted} (codes {codes})"


def test_a_node_with_the_shared_store_reads_no_other_nodes_forwarded_logs(
    mqtt_broker: Broker, tmp_path: Path, s3_server: object, s3_bucket: str
) -> None:
    """a3b8f19 moved forwarded log lines from the retained status to the aggregator's
    storage, 'readable with the storage credentials'; with the claim check those are every
    node's credentials. node-0's policy forwards its logs to the aggregator (the operator),
    not to node-1. Safe outcome: node-1 reads no line of node-0's."""
    from flame.aggregator.run_store import forwarded_logs_key

    analysis = f"rt-protocol-shared-logs-{time.monotonic_ns()}"
    fed = _shared_store_federation(mqtt_broker, tmp_path, s3_server, s3_bucket, analysis)
    policy = tmp_path / "policy.toml"
    policy.write_text("forward_logs = true\n")
    try:
        fed.start(AGGREGATOR)
        fed.start("node-0", FLAME_POLICY=str(policy))
        fed.start("node-1")
        fed.start("node-2")
        with _precondition():
            assert fed.finish(timeout=150)[AGGREGATOR] == {"total": 136.0}
    finally:
        fed.close()
    store = _colluder_store(s3_server, s3_bucket)
    try:
        text = store.get_bytes(forwarded_logs_key(analysis)).decode()  # type: ignore[attr-defined]
    except Exception as exc:  # refused: the defence holds
        text = f"refused: {exc}"
    assert "4711" not in text, text[:2000]


# --- the broker operator replays genuine messages within a run --------------------------------

THREE_EPOCHS_ANALYSIS = """
import time

def analyze(data, epoch, previous):
    time.sleep(1.5)  # room for the replays to land mid-epoch
    v = [float(x) for x in data.read_text("v.txt").split()]
    base = 0.0 if previous is None else previous["total"]
    return {"x": base + sum(v)}

def aggregate(results):
    return {"total": sum(r["x"] for r in results.values())}
"""


class Recorder:
    """The operator (broker user with readwrite on `#`): records every frame on the analysis's
    inboxes and broadcast topic, and publishes any of them again."""

    def __init__(self, broker: Broker, analysis: str) -> None:
        import threading

        import paho.mqtt.client as mqtt
        from broker import ADMIN

        self.frames: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"rec-{time.time_ns()}"
        )
        self.client.username_pw_set(ADMIN, broker.password)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.subscribe(
            [(f"flame/{analysis}/+/inbox", 1), (f"flame/{analysis}/broadcast", 1)]
        )
        self.client.loop_start()
        time.sleep(0.5)

    def _on_message(self, _client: object, _userdata: object, message: object) -> None:
        with self.lock:
            self.frames.append((str(message.topic), bytes(message.payload)))  # type: ignore[attr-defined]

    def replay(self, keep: object = None) -> int:
        with self.lock:
            frames = list(self.frames)
        for topic, payload in frames:
            self.client.publish(topic, payload, qos=1).wait_for_publish(10)
        return len(frames)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_replayed_kickoffs_aggregates_and_results_change_nothing(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    """Mid-run (epoch 2 computing), the operator re-publishes every frame recorded so far on
    every inbox: the aggregator's start and epoch-0/1 aggregates to each node, the nodes'
    epoch-0/1 results and acks. Dropped by id / epoch / run: the result is the honest one.
    Held."""
    from test_attacks_status import Spy

    analysis = f"rt-protocol-replay-{time.monotonic_ns()}"
    fed = run_of(mqtt_broker, tmp_path, analysis, THREE_EPOCHS_ANALYSIS, VALUES, epochs=3)
    recorder = Recorder(mqtt_broker, analysis)
    spy = Spy(mqtt_broker, analysis)
    try:
        fed.start_all()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if any(s.get("epoch") == 2 for s in spy.statuses("node-1")):
                break
            time.sleep(0.1)
        replayed = recorder.replay()
        assert replayed >= 6, replayed
        values = fed.finish(timeout=150)
    finally:
        recorder.close()
        spy.close()
        fed.close()
    # epoch 0: 136; epoch 1: 3 * 136 + 136 = 544; epoch 2: 3 * 544 + 136 = 1768
    assert values == {name: {"total": 1768.0} for name in (AGGREGATOR, *NODES)}, values


# --- flame status and a forged aggregator status ----------------------------------------------


def test_flame_status_shows_no_result_location_from_an_unverified_status(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    """After an honest run (no result storage configured for `flame status`), the operator
    publishes an unsigned aggregator status, retained: state done, a location and a SHA-256
    of its choosing. `flame status ID` (FLAME_ROSTER set) marks it NOT VERIFIED but still
    prints the forged location as the run's final result, where an analyst would fetch it.
    Safe outcome: the forged location appears nowhere in the output."""
    import subprocess
    import sys

    from broker import ADMIN
    from nodes import clean_env

    from flame.transport.mqtt import status_topic

    analysis = f"rt-protocol-flame-status-{time.monotonic_ns()}"
    fed = run_of(mqtt_broker, tmp_path, analysis, EPOCHS_ANALYSIS, TWO_VALUES)
    try:
        fed.start_all()
        with _precondition():
            assert fed.finish(timeout=120)[AGGREGATOR] == {"total": 36.0}
    finally:
        fed.close()
    import paho.mqtt.client as mqtt

    forged = {
        "state": "done",
        "role": "aggregation",
        "location": "s3://operator-bucket/forged/result.bin",
        "sha256": "0" * 64,
        "instance": "forged",
        "since": time.time(),
        "seq": 99,
        "at": time.time(),
        "run": "forged-run",
    }
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"op-{time.time_ns()}")
    client.username_pw_set(ADMIN, mqtt_broker.password)
    client.connect(mqtt_broker.host, mqtt_broker.port, keepalive=30)
    client.loop_start()
    topic = status_topic(analysis, AGGREGATOR)
    client.publish(topic, json.dumps(forged), qos=1, retain=True).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()
    operator = {
        **clean_env(),
        "FLAME_BROKER__URL": mqtt_broker.url,
        "FLAME_BROKER__USERNAME": "node-5",
        "FLAME_BROKER__TOKEN": mqtt_broker.password,
        "FLAME_ROSTER": fed.env["FLAME_ROSTER"],
    }
    shown = subprocess.run(
        [sys.executable, "-m", "flame", "status", analysis],
        env=operator,
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = shown.stdout + shown.stderr
    with _precondition():
        assert "NOT VERIFIED" in text, text[-2000:]
    assert "operator-bucket" not in text, text[-2000:]


# --- an earlier run's end, replayed to a node of a new run of the same analysis id -----------

FACTOR_ANALYSIS = """
def analyze(data):
    v = [float(x) for x in data.read_text("v.txt").split()]
    return {{"x": {factor} * sum(v)}}

def aggregate(results):
    return {{"total": sum(r["x"] for r in results.values())}}
"""


@pytest.mark.parametrize(
    "replay",
    [
        pytest.param(True, id="replayed"),
        pytest.param(False, id="not_replayed"),
    ],
)
def test_a_node_takes_no_finished_of_a_run_of_other_code(
    mqtt_broker: Broker, tmp_path: Path, replay: bool
) -> None:
    """Run 1 of analysis id X (code A: 1 * sum) finishes, no result storage; the operator
    recorded every inbox frame. The analyst starts X again with code B (2 * sum); node-0
    comes up before the aggregator and sees run 1's retained `done` aggregator status (no
    replay needed: it is still retained). The operator re-publishes node-0's run-1 frames;
    node-0 takes run 1's `finished` ("the run ended before this node joined") and exits 0
    with 36, the result of code A, though it runs code B (the aggregator itself refuses a
    stored result of other code). Safe outcome: node-0 does not end exit 0 with 36."""
    analysis = f"rt-protocol-rerun-{time.monotonic_ns()}"
    fed = run_of(
        mqtt_broker,
        tmp_path,
        analysis,
        FACTOR_ANALYSIS.format(factor=1),
        TWO_VALUES,
        presence_timeout=20,
    )
    recorder = Recorder(mqtt_broker, analysis)
    try:
        fed.start_all()
        with _precondition():
            assert fed.finish(timeout=120)[AGGREGATOR] == {"total": 36.0}
    finally:
        fed.close()
    recorder.client.unsubscribe([f"flame/{analysis}/+/inbox", f"flame/{analysis}/broadcast"])
    with recorder.lock:  # node-0's own inbox only
        recorder.frames = [(t, p) for t, p in recorder.frames if t.endswith("/node-0/inbox")]
    fed.analysis.write_text(textwrap.dedent(FACTOR_ANALYSIS.format(factor=2)))  # code B
    second = Federation(fed.env, fed.analysis, fed.data, fed.nodes, tmp_path / "logs2")
    from test_attacks_status import Spy

    spy = Spy(mqtt_broker, analysis)
    try:
        waiting = len([s for s in spy.statuses("node-0") if s.get("state") == "waiting"])
        node = second.start("node-0")
        with _precondition():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                now = [s for s in spy.statuses("node-0") if s.get("state") == "waiting"]
                if len(now) > waiting:
                    break
                time.sleep(0.1)
            time.sleep(1.0)
            if replay:
                assert recorder.replay() >= 2
        exit_code = _exit_code(node, 40)
        value = node.value() if exit_code == 0 else None
    finally:
        spy.close()
        recorder.close()
        second.close()
    assert not (exit_code == 0 and value == {"total": 36.0}), (exit_code, value)


# --- forwarded log lines and the operator's terminal ------------------------------------------

ESCAPE_ANALYSIS = """
import logging

def analyze(data):
    v = [float(x) for x in data.read_text("v.txt").split()]
    if data.node_id == "node-1":  # cursor up, erase line: rewrites what the operator sees
        logging.getLogger("analysis").warning("ok\\x1b[1A\\x1b[2Knode-0: ERROR forged by node-1")
    return {"total": sum(v)}

def aggregate(results):
    return {"total": sum(r["total"] for r in results.values())}
"""


def test_flame_status_logs_prints_no_control_sequences_from_a_node(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    """The analysis code on node-1 (whose policy forwards logs) logs a line with ANSI
    escapes that move the cursor up and erase a line, then a line attributed to node-0.
    Safe outcome: `flame status --logs` prints no ESC (0x1b) byte."""
    analysis = f"rt-protocol-esc-{time.monotonic_ns()}"
    fed = run_of(mqtt_broker, tmp_path, analysis, ESCAPE_ANALYSIS, TWO_VALUES)
    policy = tmp_path / "policy.toml"
    policy.write_text("forward_logs = true\n")
    results = tmp_path / "results"
    try:
        fed.start(AGGREGATOR, FLAME_STORAGE__RESULTS_DIR=str(results))
        fed.start("node-0")
        fed.start("node-1", FLAME_POLICY=str(policy))
        with _precondition():
            assert fed.finish(timeout=120)[AGGREGATOR] == {"total": 36.0}
    finally:
        fed.close()
    shown = status_logs(mqtt_broker, fed.env["FLAME_ROSTER"], analysis, results, text=False)
    with _precondition():
        assert b"forged by node-1" in shown.stdout, shown.stdout[-2000:] + shown.stderr[-2000:]
    assert b"\x1b" not in shown.stdout, shown.stdout[-2000:]

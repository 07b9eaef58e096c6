"""Red team, seat: ONE colluding analysis node holding its own valid roster key.

It runs modified flame code: it signs whatever envelope or status it likes with its own key,
sends at any time, lies about its progress and session, duplicates itself. The honest nodes
and the aggregator are flame's own, over the in-memory broker with a throwaway roster (every
message and status signed and verified as over MQTT). Claims attacked: docs/threat-model.md
("another member", quorum rules), docs/explanation/run.md (re-sent kick-offs, acks, the
de-duplicating inbox) and docs/faults.md.

Attacks that are refused are passing tests; attacks that work assert the secure behaviour
and fail on the current code (left failing on purpose, see the report of branch redpeer).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from flame.aggregator.server import Aggregator
from flame.analysis.functions import AnalysisFunctions
from flame.data import Data
from flame.data.sources import MemorySource
from flame.identity import throwaway
from flame.node.runtime import AnalysisClient
from flame.transport.memory import MemoryBroker, MemoryTransport
from flame.wire.envelope import Envelope

ANALYSIS = "peer-redteam"
HONEST = ["a", "b"]
EVIL = "evil"
CSV = {"a": "x\n1\n2\n", "b": "x\n10\n20\n"}


def analyze(data: Data, epoch: int, previous: Any) -> dict[str, float]:
    frame = data.read_csv()
    return {"sum": float(frame["x"].sum()), "n": float(len(frame))}


def aggregate(results: dict[str, Any], epoch: int, previous: Any) -> dict[str, float]:
    return {
        "sum": sum(float(r["sum"]) for r in results.values()),
        "n": sum(float(r["n"]) for r in results.values()),
        "nodes": float(len(results)),
    }


class Federation:
    """Aggregator and honest nodes in threads, signed; the colluder driven by the test."""

    def __init__(
        self,
        *,
        epochs: int = 1,
        quorum: int | None = None,
        analyze_fn: Callable[..., Any] = analyze,
        aggregate_fn: Callable[..., Any] = aggregate,
        on_send: Callable[[Envelope], bool] | None = None,
        epoch_timeout: float = 20.0,
        auths: dict[str, Any] | None = None,
        csv: dict[str, str] | None = None,
    ) -> None:
        self.broker = MemoryBroker(on_send=on_send)
        self.participants = sorted([*HONEST, EVIL])
        self.auths = auths or throwaway("aggregator", self.participants)
        self.csv = csv or CSV
        self.functions = AnalysisFunctions.of(analyze_fn, aggregate_fn)
        self.aggregator = Aggregator(
            self.transport("aggregator"),
            self.functions,
            participants=self.participants,
            epochs=epochs,
            quorum=quorum,
            epoch_timeout=epoch_timeout,
            presence_timeout=20,
        )
        self.clients: dict[str, AnalysisClient] = {}
        self.outcome: dict[str, Any] = {}
        self.threads: list[threading.Thread] = []
        self.evil = self.transport(EVIL)
        self.evil_session = uuid.uuid4().hex

    def transport(self, node: str) -> MemoryTransport:
        return MemoryTransport(self.broker, ANALYSIS, node, auth=self.auths[node])

    def start_honest(self) -> None:
        for node in HONEST:
            client = AnalysisClient(
                self.transport(node),
                aggregator_id="aggregator",
                participants=self.participants,
                wait_timeout=40,
                resend_interval=1.0,
            )
            self.clients[node] = client

            def play(node: str = node, client: AnalysisClient = client) -> None:
                data = Data({"memory": MemorySource({"x.csv": self.csv[node]})}, node_id=node)
                try:
                    self.outcome[node] = client.run(self.functions, data).value
                except BaseException as exc:
                    self.outcome[node] = exc

            thread = threading.Thread(target=play, daemon=True, name=f"honest-{node}")
            thread.start()
            self.threads.append(thread)

    def run_aggregator(self) -> dict[str, Any]:
        """Run the aggregator in a thread; {"result": RunResult} or {"error": exc}."""
        box: dict[str, Any] = {}

        def go() -> None:
            try:
                box["result"] = self.aggregator.execute()
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=go, daemon=True, name="aggregator")
        thread.start()
        box["thread"] = thread
        return box

    # --- the colluder's own (modified) flame ---------------------------------------------------
    def evil_connect(self, **extra: Any) -> None:
        self.evil.connect(self.evil_status("waiting", **extra))
        self.evil.watch(["aggregator"])

    def evil_status(self, state: str, epoch: int = -1, **extra: Any) -> dict[str, Any]:
        return {
            "state": state,
            "role": "analysis",
            "session": self.evil_session,
            "epoch": epoch,
            "time": time.time(),
            **extra,
        }

    def evil_next(self, kinds: tuple[str, ...], timeout: float = 20.0) -> Envelope:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            envelope = self.evil.receive(0.2)
            if envelope is not None and envelope.kind in kinds:
                return envelope
        raise AssertionError(f"the colluder got no {kinds} within {timeout} s")

    def evil_result(self, epoch: int, body: Any, run: str | None) -> Envelope:
        return Envelope(ANALYSIS, EVIL, "aggregator", "result", epoch, body, run)

    def join(self, box: dict[str, Any], timeout: float = 40.0) -> None:
        box["thread"].join(timeout)
        for thread in self.threads:
            thread.join(timeout)


def _run_of(envelope: Envelope) -> str | None:
    body = envelope.body
    return body.get("run") if isinstance(body, dict) else None


# --- 1. re-sent kick-offs: one small signed status buys a whole aggregate ----------------------
def big_aggregate(results: dict[str, Any], epoch: int, previous: Any) -> dict[str, Any]:
    return {**aggregate(results, epoch, previous), "model": np.zeros(1 << 17)}  # 1 MiB


def test_a_member_flapping_its_link_count_does_not_get_the_aggregate_over_and_over() -> None:
    """run.md: "the aggregator sends the current kick-off again to every node whose session
    is new (its status' `link` count changed)". The colluder signs statuses of its own live
    process whose `link` alternates: each one costs it ~300 bytes and the aggregator a whole
    kick-off (here a 1 MiB aggregate), sent synchronously inside the epoch's result loop.
    Secure: re-sends to one node are bounded (rate-limited, or only on a real new session)."""
    sent: dict[str, int] = {"count": 0, "bytes": 0}

    def count(envelope: Envelope) -> bool:
        if envelope.recipient == EVIL and envelope.kind == "aggregate":
            sent["count"] += 1
            sent["bytes"] += len(envelope.signed or b"")
        return True

    fed = Federation(epochs=2, aggregate_fn=big_aggregate, on_send=count)
    fed.start_honest()
    fed.evil_connect(link=0)
    box = fed.run_aggregator()
    start = fed.evil_next(("start",))
    fed.evil.send(fed.evil_result(0, {"sum": 5.0, "n": 1.0}, _run_of(start)))
    fed.evil_next(("aggregate",))
    before = sent["count"]
    flaps = 60
    for link in range(1, flaps + 1):
        fed.evil.announce(fed.evil_status("computing", 1, link=link % 2))
    time.sleep(1.0)  # the aggregator works through the statuses
    resent, resent_bytes = sent["count"] - before, sent["bytes"]
    fed.evil.send(fed.evil_result(1, {"sum": 5.0, "n": 1.0}, _run_of(start)))
    fed.join(box)
    assert "result" in box, box.get("error")
    print(f"{flaps} flapping statuses -> {resent} kick-offs re-sent, {resent_bytes >> 20} MiB")
    assert resent <= 3, f"{flaps} statuses made the aggregator send {resent} kick-offs of 1 MiB"


# --- 2. the inbox buffer is bounded by count, not bytes -----------------------------------------
def _buffered_from(pending: Any, sender: str) -> int:
    total = 0
    for envelope in list(pending):
        if envelope.sender == sender and isinstance(envelope.body, dict):
            total += sum(v.nbytes for v in envelope.body.values() if isinstance(v, np.ndarray))
    return total


def _flood(fed: Federation, target: str, count: int, size: int) -> None:
    for _ in range(count):
        body = {"blob": np.ones(size // 8)}
        fed.evil.send(Envelope(ANALYSIS, EVIL, target, "message", 0, body, "chat"))


def test_a_member_cannot_make_an_honest_node_buffer_unbounded_bytes() -> None:
    """mailbox.py keeps messages nobody asked for yet, up to 10,000 envelopes whatever their
    size; the ACL lets every member write to every inbox. The colluder sends 48 valid,
    signed 1 MiB free-form messages to honest node a while a waits for its kick-off: a holds
    all of them (on MQTT each may be up to the reassembly budget: 10,000 x 64 MiB). The
    chunk budget caps what one member may pin in a node only while a transfer is open.
    Secure: what one peer's unsolicited messages may pin is bounded in bytes (≤ 16 MiB)."""
    fed = Federation(epochs=1)
    fed.start_honest()
    fed.evil_connect()
    box = fed.run_aggregator()
    start = fed.evil_next(("start",))
    time.sleep(0.5)  # a and b have sent their results and wait for the end
    _flood(fed, "a", 48, 1 << 20)
    time.sleep(2.0)
    held = _buffered_from(fed.clients["a"].mailbox._pending, EVIL)
    fed.evil.send(fed.evil_result(0, {"sum": 5.0, "n": 1.0}, _run_of(start)))
    fed.join(box)
    assert "result" in box, box.get("error")
    print(f"honest node a buffers {held >> 20} MiB of the colluder's messages")
    assert held <= 16 << 20, f"node a holds {held >> 20} MiB sent by one peer"


def test_a_member_cannot_make_the_aggregator_buffer_unbounded_bytes() -> None:
    """The same flood into the aggregator's inbox during the epoch's result loop: its
    `_is_protocol` takes no free-form message, so each is kept in the mailbox's pending list."""
    fed = Federation(epochs=1)
    fed.start_honest()
    fed.evil_connect()
    box = fed.run_aggregator()
    start = fed.evil_next(("start",))
    _flood(fed, "aggregator", 48, 1 << 20)
    time.sleep(2.0)
    held = _buffered_from(fed.aggregator.mailbox._pending, EVIL)
    fed.evil.send(fed.evil_result(0, {"sum": 5.0, "n": 1.0}, _run_of(start)))
    fed.join(box)
    assert "result" in box, box.get("error")
    print(f"the aggregator buffers {held >> 20} MiB of the colluder's messages")
    assert held <= 16 << 20, f"the aggregator holds {held >> 20} MiB sent by one peer"


# --- 3. counted twice, future epochs, replacing an honest result --------------------------------
def test_two_processes_with_one_key_are_counted_once() -> None:
    """A second process with the colluder's key sends results only (no status: no instance
    conflict to notice). Each result has a fresh id; the aggregator keys results by signer."""
    fed = Federation(epochs=1)
    fed.start_honest()
    fed.evil_connect()
    twin = fed.transport(EVIL)
    twin._connected = True  # a second process of the same node, that says nothing else
    box = fed.run_aggregator()
    start = fed.evil_next(("start",))
    run = _run_of(start)
    twin.send(fed.evil_result(0, {"sum": 1000.0, "n": 1.0}, run))
    fed.evil.send(fed.evil_result(0, {"sum": 5.0, "n": 1.0}, run))
    fed.join(box)
    assert "result" in box, box.get("error")
    value = box["result"].value
    assert value["nodes"] == 3.0
    assert value["sum"] - 33.0 in (5.0, 1000.0)  # one of its two answers, never both


def test_results_for_future_epochs_or_other_runs_change_nothing() -> None:
    """Sent early for epoch 1 (and a huge epoch number) and with another run id: nothing but
    its own answers to the kick-offs count (another node's name: tests/test_attacks_broker)."""
    fed = Federation(epochs=2)
    fed.start_honest()
    fed.evil_connect()
    box = fed.run_aggregator()
    start = fed.evil_next(("start",))
    run = _run_of(start)
    fed.evil.send(fed.evil_result(1, {"sum": 1e9, "n": 1.0}, run))
    fed.evil.send(fed.evil_result(2**40, {"sum": 1e9, "n": 1.0}, run))
    fed.evil.send(fed.evil_result(0, {"sum": 1e9, "n": 1.0}, "another-run"))
    fed.evil.send(fed.evil_result(0, {"sum": 5.0, "n": 1.0}, run))
    fed.evil_next(("aggregate",))
    fed.evil.send(fed.evil_result(1, {"sum": 7.0, "n": 1.0}, run))
    fed.join(box)
    assert "result" in box, box.get("error")
    history = box["result"].history
    assert [r.nodes for r in history] == [sorted([*HONEST, EVIL])] * 2
    assert box["result"].value["sum"] == 3.0 + 30.0 + 7.0


# --- 4. the colluder picks the run id: an earlier run's genuine result counts again ------------
def slow_analyze(data: Data, epoch: int, previous: Any) -> dict[str, float]:
    time.sleep(1.5)  # the replay is there first
    return analyze(data, epoch, previous)


def test_a_member_cannot_make_a_new_run_adopt_an_old_run_id_and_take_a_replayed_result() -> None:
    """threat-model.md, *Replays*: "dropped by id ... and by epoch"; run.md: control messages
    name their run, so leftovers of an earlier run are not acted on (pinned for the operator
    alone by test_attacks_broker::test_a_result_captured_in_one_run_is_not_accepted_in_the_next,
    where the new run has a new id). Here the colluder's first status says it is in epoch 0
    of the earlier run R1: `Presence._choose_run` of a fresh aggregator (no storage) then
    "continues" R1, since the honest nodes' statuses name no run yet. The operator replays a's
    genuine, signed epoch-0 result of R1 (data a had then): it is accepted as a's result of
    the new run (fresh id memory, same run id, same epoch), a's real answer is "a second
    result", and the run ends exit 0 with a's old data. Secure: the new run counts a's
    current data (a fresh run id that no member's status can choose, or results bound to
    the aggregator process that asked: its `session`)."""
    captured: list[bytes] = []

    def spy(envelope: Envelope) -> bool:
        if envelope.kind == "result" and envelope.sender == "a" and envelope.signed:
            captured.append(bytes(envelope.signed))
        return True

    first = Federation(epochs=1, on_send=spy)
    first.start_honest()
    first.evil_connect()
    box = first.run_aggregator()
    old_run = _run_of(first.evil_next(("start",)))
    first.evil.send(first.evil_result(0, {"sum": 5.0, "n": 1.0}, old_run))
    first.join(box)
    assert box["result"].value["sum"] == 3.0 + 30.0 + 5.0
    assert captured, "the operator saw no result of a"

    changed = {"a": "x\n100\n200\n", "b": CSV["b"]}  # a's data now: sum 300
    second = Federation(epochs=1, auths=first.auths, csv=changed, analyze_fn=slow_analyze)
    second.start_honest()
    second.evil_connect(run=old_run)  # the lie: "I am in epoch 0 of run R1"
    box = second.run_aggregator()
    run = _run_of(second.evil_next(("start",)))
    for frame in captured:  # the operator replays a's old result into the aggregator's inbox
        second.broker.inject(ANALYSIS, "aggregator", frame)
    second.evil.send(second.evil_result(0, {"sum": 5.0, "n": 1.0}, run))
    second.join(box)
    assert "result" in box, box.get("error")
    print(f"new run id {run!r}, earlier {old_run!r}; sum {box['result'].value['sum']}")
    assert run != old_run, "the colluder chose the new run's id"
    assert box["result"].value["sum"] == 300.0 + 30.0 + 5.0, "a's old data was counted"


# --- 5. duplicates of its own result are kept whole until the aggregator is idle ---------------
def slow_b(data: Data, epoch: int, previous: Any) -> dict[str, float]:
    from flame import context

    if context().node_id == "b":
        time.sleep(4.0)  # the epoch stays open while the colluder floods
    return analyze(data, epoch, previous)


def test_duplicates_of_a_members_result_are_not_kept_whole_while_it_floods() -> None:
    """sending.py `_acknowledge_later` queues every result envelope (body and all) for an
    ack, also a second result of a node that already answered, before it is "ignored"; the
    queue is emptied by `_send_acks` only when `mailbox.next` comes back empty. The colluder
    answers, then keeps the aggregator's inbox busy with signed copies of a 256 KiB result,
    each with a fresh id: every one stays in memory while the epoch is open (and honest
    nodes' acks wait behind them). Secure: a duplicate answer is acknowledged or dropped at
    once; what one node's duplicates may pin is bounded (≤ 16 MiB)."""
    fed = Federation(epochs=1, analyze_fn=slow_b)
    fed.start_honest()
    fed.evil_connect()
    box = fed.run_aggregator()
    run = _run_of(fed.evil_next(("start",)))
    fed.evil.send(fed.evil_result(0, {"sum": 5.0, "n": 1.0}, run))
    blob = np.ones((256 << 10) // 8)
    frames = [
        b"".join(fed.evil.outgoing(fed.evil_result(0, {"sum": 5.0, "blob": blob}, run)))
        for _ in range(160)
    ]
    peak = {"bytes": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            held = 0
            for _, envelope in list(fed.aggregator._unacked):
                body = getattr(envelope, "body", None)  # what is queued may be no envelope
                body = body if isinstance(body, dict) else {}
                held += sum(v.nbytes for v in body.values() if isinstance(v, np.ndarray))
            peak["bytes"] = max(peak["bytes"], held)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for frame in frames:
        fed.broker.inject(ANALYSIS, "aggregator", frame)
    fed.join(box)
    done.set()
    watcher.join(5)
    assert "result" in box, box.get("error")
    assert box["result"].value["sum"] == 38.0
    print(f"the aggregator held {peak['bytes'] >> 20} MiB of one node's duplicate results")
    assert peak["bytes"] <= 16 << 20, f"{peak['bytes'] >> 20} MiB of duplicates kept whole"


# --- 6. forwarded node logs: one member's lines push out every other node's ----------------------
def test_a_member_cannot_push_an_honest_nodes_forwarded_lines_out_of_the_run_logs() -> None:
    """threat-model.md: the aggregator keeps "the latest 500 lines" of forwarded node logs
    with the run (`flame status ID --logs`), one deque for all nodes (failures.py
    `_note_logs`), 200 lines per message. An honest node's forwarded warning, then three
    log messages of the colluder (its own policy is its own word): a's line is gone from
    what is kept, and the aggregator's own log took 600 lines of the colluder's text.
    Secure: each node's share of the kept lines is bounded (a per-node quota)."""
    fed = Federation(epochs=1)
    fed.start_honest()
    fed.evil_connect()
    box = fed.run_aggregator()
    run = _run_of(fed.evil_next(("start",)))
    forwarder_of_a = fed.transport("a")  # a's own log forwarder (its policy: forward_logs)
    forwarder_of_a._connected = True
    warning = "WARNING disk nearly full on the data volume"
    forwarder_of_a.send(
        Envelope(ANALYSIS, "a", "aggregator", "message", 0, {"lines": [warning]}, "flame.logs")
    )
    time.sleep(0.5)
    for batch in range(3):
        lines = [f"all is well {batch}-{i}" for i in range(200)]
        fed.evil.send(
            Envelope(ANALYSIS, EVIL, "aggregator", "message", 0, {"lines": lines}, "flame.logs")
        )
    time.sleep(0.5)
    kept = list(fed.aggregator._logs)
    fed.evil.send(fed.evil_result(0, {"sum": 5.0, "n": 1.0}, run))
    fed.join(box)
    assert "result" in box, box.get("error")
    from_evil = sum(1 for line in kept if line.startswith(f"{EVIL}: "))
    print(f"kept {len(kept)} forwarded lines, {from_evil} of them the colluder's")
    assert any(warning in line for line in kept), "a's forwarded warning was pushed out"


# --- 4 over Mosquitto: real `flame run` processes, the colluder plays node-1 ----------------------
MQTT_NODES = ["node-0", "node-1"]
MQTT_ANALYSIS = """
import time

def analyze(data):
    time.sleep(%(delay)s)  # the replay arrives first
    v = [float(x) for x in data.read_text("v.txt").split()]
    return {"sum": sum(v), "n": len(v)}

def aggregate(results):
    return {"sum": sum(r["sum"] for r in results.values()), "nodes": sorted(results)}
"""


def _mqtt_federation(broker: Any, tmp_path: Any, analysis: str, values: dict[str, str]) -> Any:
    import textwrap

    from nodes import Federation as Processes
    from nodes import federation_env

    data = tmp_path / "data"
    for node, text in values.items():
        (data / node).mkdir(parents=True, exist_ok=True)
        (data / node / "v.txt").write_text(text)
    code = tmp_path / "analysis.py"
    code.write_text(textwrap.dedent(MQTT_ANALYSIS % {"delay": 3}))
    env = federation_env(broker, analysis, MQTT_NODES, presence_timeout=60, epoch_timeout=60)
    return Processes(env, code, data, MQTT_NODES, tmp_path / "logs")


class _Wire:
    """The broker operator's raw client: records topics, publishes anything."""

    def __init__(self, broker: Any, topics: list[str]) -> None:
        import paho.mqtt.client as mqtt
        from broker import ADMIN

        self.got: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"op-{uuid.uuid4()}")
        self.client.username_pw_set(ADMIN, broker.password)
        self.client.on_message = lambda _c, _u, m: self.got.append((m.topic, bytes(m.payload)))
        self.client.connect(broker.host, broker.port, keepalive=30)
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(30)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_mqtt_a_member_makes_a_new_run_take_an_old_runs_replayed_result(
    mqtt_broker: Any, tmp_path: Any
) -> None:
    """Test 4 with real processes over Mosquitto, the second run as an operator starts it
    again (same analysis id, no storage); the colluder (node-1's key, the operator's broker)
    announces node-1 as in epoch 0 of run R1 and answers for node-1. Secure: the new run
    counts node-0's current data (100), not its replayed result of R1 (1 2 3)."""
    import json
    from pathlib import Path

    import pytest
    from broker import have_mosquitto

    if not have_mosquitto():
        pytest.skip("needs the mosquitto binary")
    from flame.identity import Authenticator, Identity, Roster, verify_envelope
    from flame.transport.mqtt import inbox_topic, status_topic

    analysis = f"peer-redteam-run-{time.monotonic_ns()}"
    first = _mqtt_federation(
        mqtt_broker, tmp_path / "one", analysis, {"node-0": "1 2 3", "node-1": "10 20"}
    )
    roster = Roster.load(Path(first.env["FLAME_ROSTER"]))
    wire = _Wire(mqtt_broker, [inbox_topic(analysis, "aggregator"), status_topic(analysis, "+")])
    try:
        first.start_all()
        assert first.finish(timeout=120)["aggregator"]["sum"] == 36.0
        time.sleep(0.5)
    finally:
        first.close()
    old, old_run, code = [], None, None
    for topic, payload in wire.got:
        if topic == status_topic(analysis, "node-1"):
            with_code = json.loads(payload).get("code")
            code = with_code if isinstance(with_code, str) else code
            continue
        try:
            envelope = verify_envelope(payload, roster)
        except Exception:
            continue
        if envelope.kind == "result" and envelope.sender == "node-0":
            old.append(payload)
            old_run = envelope.category
    assert old and old_run and code, "the operator saw no result of node-0 / no code hash"

    second = _mqtt_federation(
        mqtt_broker, tmp_path / "two", analysis, {"node-0": "100", "node-1": "10 20"}
    )
    keys = Path(second.env["TEST_FLAME_IDENTITY_DIR"])
    colluder = Authenticator(Identity.load("node-1", keys / "node-1.key"), roster)
    signer = MemoryTransport(MemoryBroker(), analysis, "node-1", auth=colluder)
    wire.got.clear()
    wire.client.subscribe(inbox_topic(analysis, "node-1"), qos=1)
    lie = {
        "state": "waiting",
        "role": "analysis",
        "session": uuid.uuid4().hex,
        "run": old_run,  # "I am in epoch 0 of run R1"
        "epoch": 0,
        "code": code,
        "time": time.time(),
    }
    try:
        second.start("aggregator")
        second.start("node-0")
        time.sleep(2.0)  # node-1's process "starts" after the aggregator, as a late node does
        signer.since, signer.generation = round(time.time(), 3), 1000  # its own word
        lie["time"] = time.time()
        wire.publish(
            status_topic(analysis, "node-1"),
            json.dumps(signer.sign_status(lie)).encode(),
            retain=True,
        )
        run = None
        deadline = time.monotonic() + 60
        while run is None and time.monotonic() < deadline:
            for topic, payload in list(wire.got):
                if topic != inbox_topic(analysis, "node-1"):
                    continue
                with_run = verify_envelope(payload, roster)
                if with_run.kind == "start":
                    run = _run_of(with_run)
            time.sleep(0.1)
        assert run is not None, "node-1 got no kick-off\n" + second.processes["aggregator"].tail()
        for payload in old:  # the operator replays node-0's result of R1
            wire.publish(inbox_topic(analysis, "aggregator"), payload)
        answer = Envelope(analysis, "node-1", "aggregator", "result", 0, {"sum": 30.0}, run)
        wire.publish(inbox_topic(analysis, "aggregator"), b"".join(signer.outgoing(answer)))
        values = second.finish(timeout=120)
    finally:
        wire.close()
        second.close()
    print(f"run {run} (earlier {old_run}): {values['aggregator']}")
    assert values["aggregator"]["sum"] == 130.0, "node-0's data of the earlier run counted"

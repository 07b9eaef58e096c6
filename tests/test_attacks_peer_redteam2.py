"""Red team 2 on the peer fixes of branch redpeer (run ids of a fresh aggregator process,
rate-limited kick-off re-sends, per-sender inbox byte budgets, the slim ack queue, per-node
quotas of forwarded log lines).

Seats: ONE colluding member with its own roster key, the broker operator (reads, drops,
replays and injects raw frames), and both together. The honest nodes and the aggregator are
flame's own over the in-memory broker with a throwaway signed roster (tests.
test_attacks_peer_redteam.Federation). Refused attacks are passing tests; attacks that work
assert the secure behaviour and fail on the current code (see the report of branch redpeer2).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from test_attacks_peer_redteam import ANALYSIS, EVIL, HONEST, Federation, _run_of, aggregate

from flame.analysis.functions import AnalysisFunctions
from flame.data import Data
from flame.data.sources import MemorySource
from flame.identity import throwaway
from flame.node.mailbox import Mailbox
from flame.node.runtime import AnalysisClient
from flame.transport.memory import MemoryBroker, MemoryTransport
from flame.utils.deadline import Deadline
from flame.wire.envelope import Envelope, encode_parts


def _pair(
    names: list[str],
) -> tuple[MemoryBroker, dict[str, MemoryTransport]]:
    broker = MemoryBroker()
    auths = throwaway("aggregator", names)
    transports = {}
    for name in [*names, "aggregator"]:
        transport = MemoryTransport(broker, ANALYSIS, name, auth=auths[name])
        transport._connected = True
        transports[name] = transport
    return broker, transports


def _forge(fed: Federation, envelope: Envelope) -> bytes:
    """`envelope` naming another sender, signed with the colluder's own key."""
    parts = fed.auths[EVIL].seal(encode_parts(envelope))
    return b"".join(bytes(memoryview(p)) for p in parts)


def _drain(mailbox: Mailbox, seconds: float) -> None:
    """Let the mailbox read what has arrived and keep it (nobody asks for it yet)."""
    mailbox.next(lambda _e: False, Deadline(seconds))


# --- 1. the inbox's count limit is global: one member's small messages evict a peer's --------
def test_a_member_cannot_evict_an_honest_peers_acknowledged_message_by_count() -> None:
    """mailbox.py: the byte budget is per sender, but `_PENDING_LIMIT` (10,000 envelopes) is
    one limit for all senders and drops the OLDEST pending envelope whoever sent it. Honest b
    sends a a free-form message (a acknowledges it on receipt: b's `send` reports it
    delivered); the colluder then sends 10,000 tiny signed messages (~3 MB, far below its
    16 MiB byte budget). b's message is gone from a's inbox: a's `receive` never gets it.
    Secure: one sender's envelopes never push out another sender's (count per sender)."""
    broker, t = _pair(["a", "b", EVIL])
    inbox = Mailbox(t["a"])
    t["b"].send(Envelope(ANALYSIS, "b", "a", "message", 0, {"v": "honest-b"}, "chat"))
    _drain(inbox, 0.3)
    acked = t["b"].receive(1.0)
    assert acked is not None and acked.kind == "ack", "b's message was not acknowledged"
    for i in range(10_000):
        body = {"i": i}
        broker.inject(
            ANALYSIS,
            "a",
            b"".join(t[EVIL].outgoing(Envelope(ANALYSIS, EVIL, "a", "message", 0, body, "x"))),
        )
    _drain(inbox, 3.0)
    got = inbox.next(lambda e: e.sender == "b" and e.category == "chat", Deadline(0.5))
    assert got is not None, "b's acknowledged message was evicted by the colluder's flood"


# --- 2. the operator replays a kick-off of an earlier aggregator process to an honest node -----
def _two_epochs(fed: Federation, box: dict[str, Any], run: str | None) -> None:
    fed.evil.send(fed.evil_result(0, {"sum": 5.0, "n": 1.0}, run))
    fed.evil_next(("aggregate",))
    fed.evil.send(fed.evil_result(1, {"sum": 7.0, "n": 1.0}, run))
    fed.join(box)


def test_a_replayed_start_of_an_earlier_aggregator_process_does_not_pull_a_node_out() -> None:
    """instructions.py: a `start` of epoch 0 under a run id the node has not left, while its
    epoch-0 result is its last one sent, makes it leave its run and re-send its cached
    result under the new id. The operator captured the aggregator's signed `start` to a in an
    earlier run and replays it into a's inbox right after a answered epoch 0 of this run.
    Refused: the kick-off names the earlier aggregator process (`session`), which is not
    the live one; a stays in this run and both epochs count its current data."""
    captured: list[bytes] = []

    def spy(envelope: Envelope) -> bool:
        if envelope.kind == "start" and envelope.recipient == "a" and envelope.signed:
            captured.append(bytes(envelope.signed))
        return True

    first = Federation(epochs=1, on_send=spy)
    first.start_honest()
    first.evil_connect()
    box = first.run_aggregator()
    first.evil.send(
        first.evil_result(0, {"sum": 5.0, "n": 1.0}, _run_of(first.evil_next(("start",))))
    )
    first.join(box)
    assert "result" in box and captured

    second = Federation(epochs=2, auths=first.auths)
    second.start_honest()
    second.evil_connect()
    box = second.run_aggregator()
    run = _run_of(second.evil_next(("start",)))
    time.sleep(0.5)  # a has answered epoch 0
    for frame in captured:
        second.broker.inject(ANALYSIS, "a", frame)
    time.sleep(0.5)
    _two_epochs(second, box, run)
    assert "result" in box, box.get("error")
    assert box["result"].value["sum"] == 3.0 + 30.0 + 7.0
    assert not isinstance(second.outcome.get("a"), BaseException), second.outcome.get("a")


# --- 3. the colluder sends a `start` itself ---------------------------------------------------
def test_a_members_own_start_does_not_make_a_node_resend_its_result_elsewhere() -> None:
    """The colluder signs (with its own key) a `start` of epoch 0 under a run id of its own,
    naming the live aggregator's session, to honest node a, after a answered epoch 0; and a
    copy claiming to be the aggregator's (sender field "aggregator", its own signature).
    Refused: a reads control messages only from the aggregator's verified key; a's result is
    not re-sent to the colluder's run, a stays, both epochs count."""
    fed = Federation(epochs=2)
    resent: list[Envelope] = []
    fed.broker.on_send = lambda e: (resent.append(e) if e.kind == "result" else None) or True
    fed.start_honest()
    fed.evil_connect()
    box = fed.run_aggregator()
    start = fed.evil_next(("start",))
    run = _run_of(start)
    session = start.body.get("session") if isinstance(start.body, dict) else None
    time.sleep(0.5)
    body = {"previous": None, "run": "evil-run", "session": session}
    fed.evil.send(Envelope(ANALYSIS, EVIL, "a", "start", 0, body, None))
    forged = Envelope(ANALYSIS, "aggregator", "a", "start", 0, body, None)
    fed.broker.inject(ANALYSIS, "a", _forge(fed, forged))
    time.sleep(0.5)
    _two_epochs(fed, box, run)
    assert "result" in box, box.get("error")
    assert box["result"].value["sum"] == 3.0 + 30.0 + 7.0
    assert not [e for e in resent if e.sender == "a" and e.category == "evil-run"]


# --- 4. forwarded log lines under another node's name -----------------------------------------
def test_a_member_cannot_write_forwarded_lines_as_another_node() -> None:
    """failures.py keeps lines as "<sender>: <text>" within the sender's share. The colluder
    forwards lines that start with "a: " after a newline / line separator, and a frame whose
    sender field says "a" (its own signature). Refused: every kept line it wrote starts with
    its own name and no line is attributed to a."""
    fed = Federation(epochs=1)
    fed.start_honest()
    fed.evil_connect()
    box = fed.run_aggregator()
    run = _run_of(fed.evil_next(("start",)))
    lines = ["ok\na: WARNING forged", "ok\u2028a: WARNING forged", "ok\ra: WARNING forged"]
    fed.evil.send(
        Envelope(ANALYSIS, EVIL, "aggregator", "message", 0, {"lines": lines}, "flame.logs")
    )
    as_a = Envelope(ANALYSIS, "a", "aggregator", "message", 0, {"lines": ["forged"]}, "flame.logs")
    fed.broker.inject(ANALYSIS, "aggregator", _forge(fed, as_a))
    time.sleep(0.5)
    kept = list(fed.aggregator._logs)
    fed.evil.send(fed.evil_result(0, {"sum": 5.0, "n": 1.0}, run))
    fed.join(box)
    assert "result" in box, box.get("error")
    assert kept and all(line.startswith(f"{EVIL}: ") for line in kept), kept
    assert not any(
        "forged" in part and part.lstrip().startswith("a: ")
        for line in kept
        for part in line.splitlines()
    ), kept


# --- 5. the budget class is chosen by the sender: "flame." categories get 16x the budget ---------
def test_a_member_cannot_pin_more_than_the_free_form_budget_by_naming_a_runtime_category() -> None:
    """mailbox.py `_budget`: an unasked envelope counts against the 256 MiB "runtime" budget
    when its category starts with "flame." (or its kind is not "message"). Both are the
    sender's choice: `flame.context().send` refuses reserved categories, but the colluder runs
    its own code. It sends honest node a 48 signed 1 MiB messages of category "flame.junk"
    (no such runtime traffic exists, and a member's runtime messages to a peer are only
    secure-sum rounds a asked for): a keeps all 48 MiB (unacknowledged, so the colluder is
    not even slowed down). Secure: runtime-class budget only for runtime categories this
    node expects from that sender; anything else is held within the free-form 16 MiB."""
    import numpy as np

    broker, t = _pair(["a", "b", EVIL])
    inbox = Mailbox(t["a"])
    for _ in range(48):
        body = {"blob": np.ones((1 << 20) // 8)}
        envelope = Envelope(ANALYSIS, EVIL, "a", "message", 0, body, "flame.junk")
        broker.inject(ANALYSIS, "a", b"".join(t[EVIL].outgoing(envelope)))
    _drain(inbox, 3.0)
    held = sum(
        v.nbytes
        for e in inbox._pending
        if e.sender == EVIL and isinstance(e.body, dict)
        for v in e.body.values()
        if isinstance(v, np.ndarray)
    )
    print(f"node a holds {held >> 20} MiB of the colluder's 'flame.junk' messages")
    assert held <= 16 << 20, f"node a holds {held >> 20} MiB sent by one peer"


# --- 6. operator + colluder: replayed statuses make a checkpoint continue an old run -----------
class _Store:
    """A checkpoint of epoch 0 (taken in some run; it does not say which)."""

    def __init__(self) -> None:
        self.final: Any = None

    def load_final(self) -> Any:
        return None

    def load_checkpoint(self) -> Any:
        from flame.aggregator.records import Checkpoint

        return Checkpoint(1, {"sum": 0.0, "n": 0.0, "nodes": 0.0}, [])

    def save_checkpoint(self, checkpoint: Any) -> None:
        pass

    def save_final(self, result: Any) -> str:
        self.final = result
        return "memory"


def test_replayed_statuses_cannot_make_a_checkpoint_continue_an_old_run() -> None:
    """presence._choose_run, resuming from a checkpoint: the nodes' run is continued when a
    quorum of participants name it and none another. The checkpoint does not name its run,
    and a status is taken as the node's word whenever it was signed. The operator captured
    a's and b's signed retained statuses (run R_old, epoch 1) and their signed epoch-1 results
    in an earlier run; for a restarted aggregator with a checkpoint (next epoch 1) it serves
    those statuses as retained ones (the honest processes are not up yet), the colluder
    names R_old too. Secure: the aggregator does not continue R_old on replayed statuses (the
    checkpoint's own run id, or statuses signed after this process started), and the
    replayed results of R_old never count."""
    statuses: dict[str, dict[str, Any]] = {}
    results: list[bytes] = []

    def spy(envelope: Envelope) -> bool:
        if envelope.kind == "result" and envelope.sender in HONEST and envelope.epoch == 1:
            results.append(bytes(envelope.signed or b""))
        return True

    first = Federation(epochs=2, on_send=spy)
    first.start_honest()
    first.evil_connect()
    box = first.run_aggregator()
    old_run = _run_of(first.evil_next(("start",)))
    first.evil.send(first.evil_result(0, {"sum": 5.0, "n": 1.0}, old_run))
    first.evil_next(("aggregate",))
    deadline = time.monotonic() + 10
    while len(statuses) < 2 and time.monotonic() < deadline:
        for node, status in first.broker.statuses(ANALYSIS).items():
            if node in HONEST and status.get("run") == old_run and status.get("epoch") == 1:
                statuses[node] = status
        time.sleep(0.01)
    first.evil.send(first.evil_result(1, {"sum": 7.0, "n": 1.0}, old_run))
    first.join(box)
    assert "result" in box and len(statuses) == 2 and results, (statuses.keys(), len(results))

    second = Federation(epochs=2, auths=first.auths)  # quorum: all three
    second.aggregator.store = _Store()  # type: ignore[assignment]
    for node, status in statuses.items():  # the operator's retained statuses
        second.broker.set_status(ANALYSIS, node, status)
    second.evil_session = uuid.uuid4().hex
    second.evil_connect(run=old_run)
    box = second.run_aggregator()
    kickoff = second.evil_next(("aggregate", "start"))
    run = _run_of(kickoff)
    if run == old_run:
        for frame in results:
            second.broker.inject(ANALYSIS, "aggregator", frame)
        second.evil.send(second.evil_result(1, {"sum": 7.0, "n": 1.0}, run))
    box["thread"].join(30)
    print(f"kick-off run {run}, earlier {old_run}; {box.get('result') or box.get('error')}")
    assert run != old_run, "a checkpoint continued the old run on replayed statuses"


# --- 7. kick-offs re-sent for "new processes": the colluder starts a new one 40 times a second --
def test_a_member_starting_new_processes_gets_kick_offs_at_most_every_two_seconds() -> None:
    """presence.py re-sends the current kick-off to a node whose process is new (a status of
    another `instance`), at most once per 2 s per node. The colluder connects 60 fresh
    transports of its own key within ~1.5 s (each a new instance, never an earlier one, so no
    "two processes" conflict) while the epoch with a 1 MiB aggregate is open. Refused: at
    most one re-send per 2 s."""
    from test_attacks_peer_redteam import big_aggregate

    sent = {"count": 0}

    def count(envelope: Envelope) -> bool:
        if envelope.recipient == EVIL and envelope.kind == "aggregate":
            sent["count"] += 1
        return True

    fed = Federation(epochs=2, aggregate_fn=big_aggregate, on_send=count)
    fed.start_honest()
    fed.evil_connect()
    box = fed.run_aggregator()
    run = _run_of(fed.evil_next(("start",)))
    fed.evil.send(fed.evil_result(0, {"sum": 5.0, "n": 1.0}, run))
    fed.evil_next(("aggregate",))
    before, started = sent["count"], time.monotonic()
    for _ in range(60):
        twin = fed.transport(EVIL)
        fed.evil_session = uuid.uuid4().hex
        twin.connect(fed.evil_status("computing", 1))
        time.sleep(0.025)
    time.sleep(0.5)
    elapsed = time.monotonic() - started
    resent = sent["count"] - before
    fed.evil.send(fed.evil_result(1, {"sum": 7.0, "n": 1.0}, run))
    fed.join(box)
    print(f"60 new processes in {elapsed:.1f} s -> {resent} kick-offs re-sent")
    assert "result" in box, box.get("error")
    assert resent <= 1 + int(elapsed / 2.0), resent


# --- 8. an aggregate of the old process queued with the new process's `start` -----------------
def epoch_of_previous(data: Data, epoch: int, previous: Any) -> dict[str, Any]:
    return {"epoch": float(epoch), "previous": previous}


def test_a_node_rebound_to_a_new_run_does_not_answer_it_from_the_old_runs_aggregate() -> None:
    """runtime.await_instruction keeps the newest queued kick-off (`chosen`) and reads on
    with a zero wait; instructions.admit may meanwhile rebind the node to a new run (a
    `start` of epoch 0 of a new aggregator process while the node's epoch-0 result is its
    last). The broker operator holds the aggregate of epoch 0 of run R1 (the process that
    sent it then ended) and delivers it together with the new process's status and `start`
    of R2. The node rebinds to R2 and still returns R1's aggregate as its next instruction:
    it computes epoch 1 from R1's aggregate and sends it under run R2, where R2's epoch 1
    will take it as computed from R2's own epoch-0 aggregate (a wrong aggregate, exit 0).
    Secure: after moving to R2 nothing of R1 is acted on (no epoch-1 result under R2 before
    R2 sent an aggregate)."""
    import sys

    broker = MemoryBroker()
    auths = throwaway("aggregator", ["a"])
    functions = AnalysisFunctions.of(epoch_of_previous, aggregate)
    client = AnalysisClient(
        MemoryTransport(broker, ANALYSIS, "a", auth=auths["a"]),
        aggregator_id="aggregator",
        participants=["a"],
        wait_timeout=20,
        resend_interval=5.0,
    )
    outcome: dict[str, Any] = {}

    def play() -> None:
        data = Data({"memory": MemorySource({"x.csv": "x\n1\n"})}, node_id="a")
        try:
            outcome["a"] = client.run(functions, data).value
        except BaseException as exc:
            outcome["a"] = exc

    def aggregator(session: str) -> MemoryTransport:
        transport = MemoryTransport(broker, ANALYSIS, "aggregator", auth=auths["aggregator"])
        transport.connect(
            {"state": "running", "role": "aggregator", "session": session, "epoch": 0}
        )
        transport.watch(["a"])
        return transport

    def control(kind: str, session: str, run: str, **body: Any) -> Envelope:
        return Envelope(
            ANALYSIS, "aggregator", "a", kind, 0, {**body, "run": run, "session": session}
        )

    s1, s2, r1, r2 = uuid.uuid4().hex, uuid.uuid4().hex, "run-one-" + "1" * 8, "run-two-" + "2" * 8
    one = aggregator(s1)
    threading.Thread(target=play, daemon=True).start()
    one.send(control("start", s1, r1, previous=None))
    first = _next_result(one, 10)
    assert first.epoch == 0 and first.category == r1
    one._connected = False  # process one ends; its aggregate of epoch 0 was held by the operator
    held = b"".join(one.outgoing(control("aggregate", s1, r1, value={"from": "R1"})))
    two = MemoryTransport(broker, ANALYSIS, "aggregator", auth=auths["aggregator"])
    start = b"".join(two.outgoing(control("start", s2, r2, previous=None)))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # the three arrive together, as the operator releases them
    try:
        broker.inject(ANALYSIS, "a", held)
        two.connect({"state": "running", "role": "aggregator", "session": s2, "epoch": 0})
        broker.inject(ANALYSIS, "a", start)
    finally:
        sys.setswitchinterval(interval)
    two.watch(["a"])
    seen = []
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        envelope = two.receive(0.2)
        if envelope is not None and envelope.kind == "result":
            seen.append((envelope.epoch, envelope.category, envelope.body))
    two.send(control("abort", s2, r2, reason="test over"))
    print(f"results to the new process: {seen}")
    assert (0, r2) in [(e, c) for e, c, _ in seen], "a did not re-send its epoch-0 result"
    # (an epoch-1 result under R1 is possible when a takes R1's aggregate before it learns of
    # the new process; the new process refuses it by its run id, so only R2's count here)
    assert not [s for s in seen if s[0] >= 1 and s[1] == r2], "a answered R2 from R1's aggregate"


def _next_result(transport: MemoryTransport, timeout: float) -> Envelope:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        envelope = transport.receive(0.2)
        if envelope is not None and envelope.kind == "result":
            return envelope
    raise AssertionError("no result")

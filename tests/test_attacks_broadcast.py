"""Red team (redteam3): the aggregator's broadcast topic under an attacker holding the broker.

The attacker publishes, replays (also as retained messages) and withholds anything on
`flame/ID/broadcast`. A node must act only on genuine kick-offs of the live aggregator
process, a node whose policy declines other sites' aggregates (share_aggregate = false) must
not be sent them, and a broadcast the broker refuses must fail loudly, naming the topic.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from broker import ADMIN, Broker, have_mosquitto
from test_broadcast import Federation, kickoff, kinds

from flame.errors import TransportError
from flame.transport.mqtt import MqttTransport, broadcast_topic
from flame.wire.chunks import CHUNK_MAGIC, REFERENCE_MAGIC
from flame.wire.envelope import EVERYONE, Envelope, encode

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")


@pytest.fixture
def fed(mqtt_broker: Broker) -> Iterator[Federation]:
    made = Federation(mqtt_broker, ["alice", "bob", "carol"])
    yield made
    made.close()


def admin(broker: Broker) -> Any:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"rt3-admin-{time.monotonic_ns()}",
        protocol=mqtt.MQTTv5,
    )
    client.username_pw_set(ADMIN, broker.password)
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    return client


def frame(transport: MqttTransport, envelope: Envelope) -> bytes:
    return b"".join(bytes(p) for p in transport.outgoing(envelope))


def spy_topics(transport: MqttTransport) -> list[str]:
    """Every topic the broker delivers to `transport` from now on (before any check)."""
    seen: list[str] = []
    client = transport.client
    get = client.get

    def spying(timeout: float) -> Any:
        message = get(timeout)
        if message is not None:
            seen.append(message.topic)
        return message

    client.get = spying  # type: ignore[method-assign]
    return seen


def test_a_declining_node_is_not_sent_broadcasts_by_a_subscription_left_in_its_session(
    fed: Federation,
) -> None:
    """share_aggregate = false: the aggregate must not even reach the node's process (its
    earlier process, which shared, left the broadcast subscription in the broker session)."""
    aggregator = fed.join("aggregator", broadcasts=False)
    alice = fed.join("alice")
    fed.join("bob")
    alice.close()
    again = fed.join("alice", broadcasts=False)
    seen = spy_topics(again)
    aggregator.broadcast(kickoff(fed.analysis), ["bob", "carol"]).wait()
    assert kinds(again, 1.0) == []
    assert broadcast_topic(fed.analysis) not in seen, "the aggregate reached the declining node"


@pytest.mark.xfail(
    strict=True,
    reason="open: broadcasts queued in the broker session while the node was away (its earlier "
    "process shared) are delivered before the new, declining process can unsubscribe; the "
    "transport drops them unread, but the aggregate reaches the node",
)
def test_broadcasts_queued_while_a_now_declining_node_was_away_do_not_reach_it(
    fed: Federation,
) -> None:
    aggregator = fed.join("aggregator", broadcasts=False)
    alice = fed.join("alice")
    fed.join("bob")
    alice.close()
    aggregator.broadcast(kickoff(fed.analysis), ["bob", "carol"]).wait()  # alice is away
    time.sleep(0.3)
    again = fed.transport("alice")  # now share_aggregate = false
    seen: list[str] = []
    original = again._handle

    def spying(message: Any) -> Any:
        seen.append(message.topic)
        return original(message)

    again._handle = spying  # type: ignore[method-assign]
    again.connect({"state": "waiting"})
    assert kinds(again, 1.0) == []
    assert broadcast_topic(fed.analysis) not in seen, "the queued aggregate reached the node"


def test_malformed_and_misaddressed_frames_on_the_broadcast_topic_are_dropped(
    fed: Federation,
) -> None:
    aggregator = fed.join("aggregator", broadcasts=False)
    alice = fed.join("alice")
    bob = fed.join("bob")
    signer = fed.transport("aggregator")  # the genuine aggregator key, for misaddressed frames
    topic = broadcast_topic(fed.analysis)
    other = Envelope("other-analysis", "aggregator", EVERYONE, "aggregate", 3, {"value": 1})
    hostile = [
        b"",
        b"\x00",
        b"FLM",
        b"FLS",
        b"garbage" * 100,
        CHUNK_MAGIC + b"\x00" * 64,
        REFERENCE_MAGIC + b"\x00" * 64,
        b"FLS" + b"\xff" * 200,
        frame(signer, kickoff(fed.analysis))[:-1],  # truncated signature
        frame(signer, Envelope(fed.analysis, "aggregator", "alice", "aggregate", 3, {"v": 1})),
        frame(signer, other),  # a genuine broadcast of another analysis
        encode(kickoff(fed.analysis)),  # unsigned
        b"FLM" + b"\x00" * 2_000_000,  # over any limit
    ]
    client = admin(fed.broker)
    try:
        for payload in hostile:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
        client.publish(topic, b"FLS-retained-junk", qos=1, retain=True).wait_for_publish(5)
        late = fed.join("carol")  # gets the retained junk at subscribe time
        assert kinds(alice, 2.0) == []
        assert kinds(bob, 0.5) == []
        assert kinds(late, 0.5) == []
        assert alice.dropped >= len(hostile) - 2  # b"" may be taken as a cleared message
        # every node still works: a genuine kick-off comes through after all that
        aggregator.broadcast(kickoff(fed.analysis), ["alice", "bob", "carol"]).wait()
        for node in (alice, bob, late):
            assert kinds(node, 1.0) == [("aggregate", {"value": 42, "session": "s"})]
    finally:
        with contextlib.suppress(Exception):
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        client.loop_stop()
        client.disconnect()


def test_a_genuine_broadcast_replayed_as_retained_is_only_a_stale_kick_off(
    fed: Federation,
) -> None:
    """Transport level: a captured genuine broadcast replayed (retained) arrives as what it
    was, an old aggregator process's kick-off with its session; the client's session check
    (test below, whole run) must drop it."""
    aggregator = fed.join("aggregator", broadcasts=False)
    alice = fed.join("alice")
    fed.join("bob")
    captured = frame(aggregator, kickoff(fed.analysis))
    client = admin(fed.broker)
    try:
        client.publish(broadcast_topic(fed.analysis), captured, qos=1, retain=True)
        got = kinds(alice, 1.0)
        assert got == [("aggregate", {"value": 42, "session": "s"})]
        late = fed.join("carol")
        assert kinds(late, 1.0) == [("aggregate", {"value": 42, "session": "s"})]
    finally:
        client.publish(broadcast_topic(fed.analysis), b"", qos=1, retain=True).wait_for_publish(5)
        client.loop_stop()
        client.disconnect()


def test_a_refused_broadcast_fails_loudly_naming_the_topic(tmp_path: Any) -> None:
    broker = Broker(tmp_path / "broker")
    (broker.directory / "acl").write_text(
        f"user {ADMIN}\ntopic readwrite #\n\n"
        "pattern read flame/+/%u/inbox\n"
        "pattern write flame/+/+/inbox\n"
        "pattern readwrite flame/+/%u/status\n"
        "pattern read flame/+/+/status\n"
        "pattern read flame/+/broadcast\n"  # read only: the aggregator may not publish
    )
    with broker:
        fed = Federation(broker, ["alice", "bob"])
        try:
            aggregator = fed.join("aggregator", broadcasts=False)
            fed.join("alice")
            fed.join("bob")
            started = time.monotonic()
            delivery = aggregator.broadcast(kickoff(fed.analysis), ["alice", "bob"], timeout=5)
            with pytest.raises(TransportError, match=r"refused the message on flame/.*/broadcast"):
                delivery.wait()
            assert time.monotonic() - started < 6
        finally:
            fed.close()


# --- whole runs: real `flame run` processes ------------------------------------------------

RUN_ANALYSIS = """
def analyze(data, epoch, previous):
    return {"saw": previous is not None}

def aggregate(results, epoch, previous):
    return {"total": 100 + epoch, "saw": {n: r["saw"] for n, r in sorted(results.items())}}
"""


OLD_ACL = (
    f"user {ADMIN}\ntopic readwrite #\n\n"
    "pattern read flame/+/%u/inbox\n"
    "pattern write flame/+/+/inbox\n"
    "pattern readwrite flame/+/%u/status\n"
    "pattern read flame/+/+/status\n"
)  # written before broadcasts: no line for flame/ID/broadcast


def _whole_roster_run(
    broker: Broker,
    tmp_path: Any,
    nodes: list[str],
    epochs: int,
    *,
    analysis_id: str | None = None,
    code: str = "",
    value: str = "1",
    **extra: str,
) -> tuple[Any, str]:
    from identities import federation as make_identities
    from nodes import IDENTITY_DIR, federation_env
    from nodes import Federation as Processes

    analysis_id = analysis_id or f"rt3-{time.monotonic_ns()}"
    tmp_path.mkdir(parents=True, exist_ok=True)
    ids = tmp_path.parent / "ids" if code else tmp_path / "ids"  # code: runs share a roster
    made = make_identities(ids, nodes)
    env = federation_env(
        broker,
        analysis_id,
        nodes,
        epochs=epochs,
        presence_timeout=30,
        epoch_timeout=30,
        FLAME_ROSTER=made["aggregator"]["FLAME_ROSTER"],
        **{IDENTITY_DIR: str(ids / "keys")},
        **extra,
    )
    script = tmp_path / "analysis.py"
    script.write_text(code or RUN_ANALYSIS)
    for node in nodes:
        (tmp_path / "data" / node).mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / node / "v.txt").write_text(value + "\n")
    return Processes(env, script, tmp_path / "data", nodes, tmp_path / "logs"), analysis_id


def _decode_any(payload: bytes) -> Envelope | None:
    from flame.identity.signing import SIGNED_MAGIC, unwrap_unverified
    from flame.wire.envelope import decode

    try:
        if payload[:3] == SIGNED_MAGIC:
            return decode(unwrap_unverified(payload))
        return decode(payload)
    except Exception:
        return None


def test_a_declining_node_gets_no_aggregate_in_a_broadcasting_run(
    mqtt_broker: Broker, tmp_path: Any
) -> None:
    """The whole roster runs (so the aggregator broadcasts); node-2's policy declines other
    sites' aggregates: nothing on its inbox or the broadcast topic it reads carries one."""
    nodes = ["node-0", "node-1", "node-2"]
    processes, analysis_id = _whole_roster_run(mqtt_broker, tmp_path, nodes, epochs=3)
    policy = tmp_path / "policy.toml"
    policy.write_text("share_aggregate = false\n")
    seen: list[tuple[str, bytes]] = []
    spy = admin(mqtt_broker)
    spy.on_message = lambda c, u, message: seen.append((message.topic, bytes(message.payload)))
    spy.subscribe(f"flame/{analysis_id}/#", qos=1)
    time.sleep(0.3)
    try:
        processes.start("aggregator")
        processes.start("node-0")
        processes.start("node-1")
        processes.start("node-2", FLAME_POLICY=str(policy))
        values = processes.finish(timeout=150)
    finally:
        spy.loop_stop()
        spy.disconnect()
        processes.close()
    assert values["aggregator"]["saw"] == {"node-0": True, "node-1": True, "node-2": False}
    assert values["node-0"] == values["aggregator"]
    assert values["node-2"] is None
    broadcast = broadcast_topic(analysis_id)
    assert any(topic == broadcast for topic, _ in seen), "the run never broadcast"
    to_node2 = [
        envelope
        for topic, payload in seen
        if topic == f"flame/{analysis_id}/node-2/inbox"
        and (envelope := _decode_any(payload)) is not None
        and envelope.kind in ("start", "aggregate", "finished")
    ]
    assert to_node2, "node-2 was sent no kick-off of its own"
    assert all(e.body.get("value") is None for e in to_node2), [e.body for e in to_node2]


@pytest.mark.xfail(
    strict=True,
    reason="open: a participant the aggregator has not heard from yet is sent the aggregate "
    "(its policy is unknown until its status arrives); it waits in that node's broker "
    "session and reaches it even if its policy says share_aggregate = false",
)
def test_a_declining_node_that_joins_late_finds_no_aggregate_queued(
    mqtt_broker: Broker, tmp_path: Any
) -> None:
    from pathlib import Path

    from flame.identity import Authenticator, Identity, Roster

    nodes = ["node-0", "node-1", "node-2"]
    processes, analysis_id = _whole_roster_run(
        mqtt_broker,
        tmp_path,
        nodes,
        epochs=2,
        FLAME_QUORUM="2",
        FLAME_PRESENCE_TIMEOUT="3",
        FLAME_EPOCH_TIMEOUT="4",
    )
    roster = Roster.load(Path(processes.env["FLAME_ROSTER"]))
    ident = Identity.load("node-2", tmp_path / "ids" / "keys" / "node-2.key")

    def node2() -> MqttTransport:
        return MqttTransport(
            mqtt_broker.settings(), analysis_id, "node-2", auth=Authenticator(ident, roster)
        )

    earlier = node2()  # an earlier process of node-2: its broker session stays
    earlier.connect({"state": "waiting"})
    earlier.close()
    try:
        processes.start("aggregator")
        processes.start("node-0")
        processes.start("node-1")
        values = processes.finish(timeout=150)
    finally:
        processes.close()
    assert values["aggregator"]["total"] == 101
    late = node2()  # now with share_aggregate = false: it takes no broadcasts
    late.connect({"state": "waiting", "share_aggregate": False})
    try:
        got = [
            (kind, body.get("value"))
            for kind, body in kinds(late, 2.0)
            if kind in ("aggregate", "finished")
        ]
    finally:
        late.close()
    assert got, "nothing queued for node-2 at all"
    assert all(value is None for _, value in got), got


@pytest.mark.parametrize("nodes_may_read", [True, False], ids=["nodes-read", "no-broadcast-lines"])
def test_a_run_under_an_acl_written_before_broadcasts_falls_back_to_copies(
    tmp_path: Any, nodes_may_read: bool
) -> None:
    """An ACL written before broadcasts (the aggregator may not publish there; the nodes may
    or may not subscribe): the aggregator's probe never arrives, so no node says it hears
    broadcasts and every kick-off goes one by one; the run completes. (Before the probe,
    Mosquitto's SUBACK made every node claim it, and the run failed.)"""
    broker = Broker(tmp_path / "broker")
    (broker.directory / "acl").write_text(
        OLD_ACL + ("pattern read flame/+/broadcast\n" if nodes_may_read else "")
    )
    with broker:
        nodes = ["node-0", "node-1", "node-2"]
        processes, _ = _whole_roster_run(broker, tmp_path, nodes, epochs=3)
        try:
            processes.start_all()
            values = processes.finish(timeout=150)
        finally:
            processes.close()
    expected = {"total": 102, "saw": {"node-0": True, "node-1": True, "node-2": True}}
    assert values == {n: expected for n in ["aggregator", *nodes]}, values


def test_an_empty_delivery_does_not_make_a_broadcast_overdue() -> None:
    """`Transport.dispatch` of a transport without acknowledgements returns `Delivery()` (a
    deadline of 0 s); joined with a broadcast still on its way, it must not fail it at once."""
    from flame.transport.base import Delivery

    class Pending:
        acknowledged = False

        def wait(self, timeout: float) -> None:
            if timeout <= 0:
                raise TransportError("not acknowledged within 0 s")
            self.acknowledged = True

        def abandon(self) -> None:
            pass

    joined = Delivery() + Delivery([("3 nodes (broadcast)", Pending())], 5.0)
    assert joined.check() is False  # still on its way, not overdue
    joined.wait()


REPLAY_ANALYSIS = """
def analyze(data, epoch, previous):
    v = float(data.read_text("v.txt"))
    return {"x": v, "base": None if previous is None else previous["total"]}

def aggregate(results, epoch, previous):
    return {"total": sum(r["x"] for r in results.values()),
            "bases": sorted({str(r["base"]) for r in results.values()})}
"""


def test_kick_offs_of_an_earlier_run_replayed_on_the_broadcast_topic_are_not_acted_on(
    mqtt_broker: Broker, tmp_path: Any
) -> None:
    """Run 1 broadcasts its kick-offs (captured by the broker). Run 2 of the same analysis id
    has other data; the broker replays run 1's genuine signed kick-offs, retained and live,
    before and while run 2's aggregator runs. Run 2 must be computed from its own aggregates
    only."""
    nodes = ["node-0", "node-1", "node-2"]
    first, analysis_id = _whole_roster_run(
        mqtt_broker, tmp_path / "run1", nodes, epochs=3, code=REPLAY_ANALYSIS, value="1"
    )
    topic = broadcast_topic(analysis_id)
    captured: list[bytes] = []
    spy = admin(mqtt_broker)
    spy.on_message = lambda c, u, m: captured.append(bytes(m.payload))
    spy.subscribe(topic, qos=1)
    time.sleep(0.3)
    try:
        first.start_all()
        assert first.finish(timeout=120)["aggregator"] == {"total": 3.0, "bases": ["3.0"]}
    finally:
        first.close()
    kickoffs = [
        payload
        for payload in captured
        if (e := _decode_any(payload)) is not None and e.kind in ("start", "aggregate")
    ]
    assert kickoffs, "run 1 broadcast no kick-off"
    second, _ = _whole_roster_run(
        mqtt_broker,
        tmp_path / "run2",
        nodes,
        epochs=3,
        analysis_id=analysis_id,
        code=REPLAY_ANALYSIS,
        value="10",
    )
    stop = False

    def replay() -> None:
        while not stop:
            for payload in kickoffs:
                spy.publish(topic, payload, qos=1)
            time.sleep(0.1)

    import threading

    spy.publish(topic, kickoffs[-1], qos=1, retain=True).wait_for_publish(5)
    replaying = threading.Thread(target=replay, daemon=True)
    replaying.start()
    try:
        for node in nodes:
            second.start(node)
        time.sleep(2)  # the nodes see the replays before the aggregator is up
        second.start("aggregator")
        values = second.finish(timeout=120)
    finally:
        stop = True
        replaying.join(5)
        spy.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        spy.loop_stop()
        spy.disconnect()
        second.close()
    honest = {"total": 30.0, "bases": ["30.0"]}
    assert values == {n: honest for n in ["aggregator", *nodes]}, values


def test_users_without_any_broadcast_right_still_connect(tmp_path: Any) -> None:
    """An operator (`flame status`) or an ACL written before broadcasts: dropping the
    broadcast subscription at connect (a node that takes none) must not fail or hang."""
    broker = Broker(tmp_path / "broker")
    (broker.directory / "acl").write_text(OLD_ACL)
    with broker:
        fed = Federation(broker, ["alice", "bob"])
        try:
            started = time.monotonic()
            watcher = fed.join("bob", broadcasts=False)
            taker = fed.join("alice")
            assert time.monotonic() - started < 5
            assert watcher.connected and taker.connected
        finally:
            fed.close()


def test_a_node_that_may_not_read_the_broadcast_topic_does_not_claim_to_hear_it(
    tmp_path: Any,
) -> None:
    """Mosquitto grants the subscription and filters at delivery, so a node claims broadcasts
    only once one has reached it: the aggregator's probe, here refused to it by the ACL."""
    broker = Broker(tmp_path / "broker")
    (broker.directory / "acl").write_text(OLD_ACL)
    with broker:
        fed = Federation(broker, ["alice", "bob"])
        try:
            aggregator = fed.join("aggregator", broadcasts=False)
            taker = fed.join("alice")
            aggregator.probe_broadcast(kickoff(fed.analysis))
            assert kinds(taker, 1.0) == []
            assert b'"broadcast"' not in taker._status_payload({"state": "computing"})
        finally:
            fed.close()

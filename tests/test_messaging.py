"""Free-form messages between nodes from inside analyze/aggregate, the same over the memory
transport and a real MQTT broker: who acknowledged, what arrived, who is missing."""

from __future__ import annotations

from broker import Broker

import flame
from flame.config import load_config
from flame.transport.mqtt import mqtt_transport_factory

NODES = {f"node-{i}": {"x.csv": f"v\n{i + 1}\n"} for i in range(3)}


def analyze(data, epoch, previous):
    ctx = flame.context()
    mine = float(data.read_csv()["v"][0])
    others = [n for n in ctx.participants if n != ctx.node_id]
    acked = ctx.send("share", {"value": mine}, to=others, timeout=20)
    got = ctx.receive("share", senders=others, timeout=20)
    silent = ctx.receive("never-sent", senders=others[:1], timeout=0.3)
    return {
        "acked": sorted(acked),
        "peer_sum": sum(m["value"] for m in got.messages.values()),
        "missing": got.missing,
        "silent_missing": silent.missing,
    }


def aggregate(results, epoch, previous):
    ctx = flame.context()
    acked = ctx.send("thanks", {"epoch": epoch}, to=list(results), timeout=20)
    return {"results": results, "aggregator_acked": sorted(acked)}


def check(value: dict) -> None:
    values = {n: float(n[-1]) + 1 for n in NODES}
    for node, result in value["results"].items():
        others = sorted(n for n in NODES if n != node)
        assert result["acked"] == others
        assert result["peer_sum"] == sum(values[n] for n in others)
        assert result["missing"] == []
        assert result["silent_missing"] == others[:1]
    assert value["aggregator_acked"] == sorted(NODES)


def test_messages_between_nodes_in_memory() -> None:
    check(flame.simulate(analyze, aggregate, data=NODES).value)


def test_messages_between_nodes_over_mqtt(fresh_broker: Broker) -> None:
    config = load_config(analysis_id="messaging", epoch_timeout=60, presence_timeout=60)
    factory = mqtt_transport_factory(fresh_broker.settings(), "messaging")
    check(flame.simulate(analyze, aggregate, data=NODES, config=config, broker=factory).value)


def test_runtime_requests_are_delivered_but_not_acknowledged() -> None:
    """Free-form messages are acknowledged (`send` waits for that); the runtime's own
    request/reply traffic (secure-sum rounds) is answered by its reply instead, so its acks
    were envelopes nobody read."""
    from flame.node.context import RESERVED_PREFIX
    from flame.node.mailbox import RUNTIME_PREFIX, Mailbox
    from flame.secure.masking import MASK
    from flame.transport.memory import MemoryBroker, MemoryTransport
    from flame.utils.deadline import Deadline
    from flame.wire.envelope import Envelope

    assert RUNTIME_PREFIX == RESERVED_PREFIX  # analysts cannot send what goes unacknowledged
    broker = MemoryBroker()
    broker.record = True
    sender = MemoryTransport(broker, "a", "aggregator")
    receiver = MemoryTransport(broker, "a", "node-0")
    for transport in (sender, receiver):
        transport.connect({"state": "waiting"})
    mailbox = Mailbox(receiver)
    sent = [
        Envelope("a", "aggregator", "node-0", "message", 1, {"round": "keys"}, MASK),
        Envelope("a", "aggregator", "node-0", "message", 1, {"v": 1}, "share"),
    ]
    for envelope in sent:
        sender.send(envelope)
    got = [mailbox.next(lambda e: e.kind == "message", Deadline(5.0)) for _ in sent]
    assert [e.id for e in got if e is not None] == [e.id for e in sent]
    acks = [e.body["ack"] for e in broker.delivered if e.kind == "ack"]
    assert acks == [sent[1].id]


def test_unasked_messages_are_bounded_in_bytes_per_sender(caplog) -> None:
    """One sender's free-form messages nobody asked for yet pin at most 16 MiB; its oldest go
    first, its newest (however large) is kept, another sender's and the runtime's traffic
    are not touched, and the sender is named in one warning for the burst."""
    import logging

    import numpy as np

    from flame.node.mailbox import PENDING_BYTES_PER_SENDER, Mailbox
    from flame.transport.memory import MemoryBroker, MemoryTransport
    from flame.utils.deadline import Deadline
    from flame.wire.envelope import Envelope

    broker = MemoryBroker()
    peers = {n: MemoryTransport(broker, "a", n) for n in ("loud", "quiet", "node-0")}
    for transport in peers.values():
        transport.connect({"state": "waiting"})
    # node-0 is the aggregator here: a result is runtime traffic only where it is expected
    mailbox = Mailbox(peers["node-0"], "node-0")

    def send(sender: str, kind: str, mib: float, category: str | None = "chat") -> Envelope:
        body = {"blob": np.ones(int(mib * (1 << 20)) // 8)}
        envelope = Envelope("a", sender, "node-0", kind, 0, body, category)  # type: ignore[arg-type]
        peers[sender].send(envelope)
        return envelope

    first_quiet = send("quiet", "message", 1)
    status_like = send("loud", "result", 4, None)  # the runtime's class: not the free budget
    loud = [send("loud", "message", 1) for _ in range(30)]
    big = send("loud", "message", 20)  # over the budget alone: kept, the rest of loud's go
    with caplog.at_level(logging.WARNING, logger="flame.node.mailbox"):
        assert mailbox.next(lambda e: False, Deadline(1.0)) is None
    held = [e.id for e in mailbox._pending]
    assert first_quiet.id in held and status_like.id in held and big.id in held
    assert not any(e.id in held for e in loud)
    loud_free = [e for e in mailbox._pending if e.sender == "loud" and e.kind == "message"]
    free = sum(e.body["blob"].nbytes for e in loud_free)
    assert free == 20 << 20 and PENDING_BYTES_PER_SENDER == 16 << 20
    warnings = [r.getMessage() for r in caplog.records if "not asked for yet" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("loud ")

"""Carrier-authenticated masking inside a run: the aggregator hands each node message to its
session with the sender its signed envelope proved (`MaskingSummer`), a node takes masking
requests only from the aggregator (`MaskingNode.answer`), and a `flame simulate` run with
its roster signs each point-to-point message once (the envelope) and forwarded ones twice.
Without a roster nothing changes: nothing is signed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import flame
from flame.config import load_config
from flame.identity import throwaway
from flame.node.context import Received
from flame.protocols.masking import Message
from flame.protocols.masking.messages import FORWARDED, POINT_TO_POINT, b64d
from flame.protocols.paillier import SecureSumSpec
from flame.secure.masking import MASK, MASKED, MaskingNode, MaskingSettings
from flame.secure.masking_sum import MaskingSummer
from flame.testing import MemoryBroker
from flame.wire.envelope import Envelope, Sealed

NODES = ("n0", "n1", "n2", "n3", "n4")
AGGREGATOR = "agg"
SETTINGS = MaskingSettings(SecureSumSpec(precision=16, bound=1024.0, max_nodes=100))
rng = np.random.default_rng(11)
VALUES = {v: rng.uniform(-100, 100, 50) for v in NODES}
Tamper = Callable[[str, dict[str, Any]], None]


class Net:
    """The aggregator's context for a MaskingSummer, with MaskingNodes answering in this
    process: each request envelope goes to its recipient's `answer` (after `deliver`, which
    may hand the node other envelopes first), and `tamper` may rewrite the replies before
    the aggregator reads them (a colluding node writes what it likes into its own signed
    envelope; the reply keys are the envelopes' verified senders)."""

    def __init__(self, signed: bool, tamper: Tamper | None = None) -> None:
        auths: dict[str, Any] = throwaway(AGGREGATOR, NODES) if signed else {}
        self.auth = auths.get(AGGREGATOR)
        self.nodes = {
            v: MaskingNode(SETTINGS, "ana", v, NODES, AGGREGATOR, auths.get(v)) for v in NODES
        }
        self.analysis_id, self.node_id = "ana", AGGREGATOR
        self._mailbox = SimpleNamespace(transport=self)
        self.tamper = tamper
        self.deliver: Callable[[Envelope], None] = lambda envelope: None
        self.sent: list[Envelope] = []

    def send(self, envelope: Envelope) -> None:
        assert envelope.category == MASK and envelope.sender == AGGREGATOR
        self.sent.append(envelope)

    def receive(self, category: str, *, senders: Any, timeout: float) -> Received:
        replies = {}
        for envelope in self.sent:
            self.deliver(envelope)
            replies[envelope.recipient] = self.nodes[envelope.recipient].answer(envelope)
        step = self.sent[0].body["round"]
        self.sent = []
        if self.tamper is not None:
            self.tamper(step, replies)
        return Received(replies, [])

    def run(self, epoch: int = 0) -> tuple[Any, MaskingSummer]:
        summer = MaskingSummer(SETTINGS, 5.0, self, NODES, self.auth)  # type: ignore[arg-type]
        results = {v: n.seal({"x": flame.secure(VALUES[v])}, epoch) for v, n in self.nodes.items()}
        return summer(results, epoch), summer


def exact(nodes: tuple[str, ...] = NODES) -> Any:
    return sum(np.rint(VALUES[v] * 2**16).astype(np.int64) for v in nodes) / 2**16


def test_a_reply_is_pinned_to_its_envelopes_sender() -> None:
    """n1 colludes: its reply to the unmask request carries a reveal in n2's name with
    shares that would spoil n2's seed. The aggregator hands it to the session as n1's
    (`MaskingSummer._round`: `receive(sender=...)`) and it is refused; n2's own counts."""

    def forge(step: str, replies: dict[str, Any]) -> None:
        if step != "unmask":
            return
        genuine = Message.from_bytes(replies["n2"]["messages"]["x"].data)
        body = {kind: dict.fromkeys(part, "1") for kind, part in genuine.body.items()}
        forged = replace(genuine, body=body).to_bytes()
        replies["n1"] = {"messages": {"x": Sealed("masking", forged)}}

    results, summer = Net(signed=True, tamper=forge).run()
    assert np.array_equal(results.secure["x"], exact())
    assert results.contributors["x"] == list(NODES)
    assert set(summer.refusals) == {"n1"}
    assert "in the name of 'n2' arrived from 'n1'" in summer.refusals["n1"]


def test_a_node_takes_masking_requests_from_the_aggregator_only() -> None:
    """n3 sends n0 a copy of the aggregator's keys request in its own envelope: n0 refuses
    it before its session moves, and still answers the aggregator's."""
    net = Net(signed=True)
    refused: list[dict[str, Any]] = []

    def relay(envelope: Envelope) -> None:
        if envelope.recipient == "n0" and envelope.body["round"] == "keys":
            refused.append(net.nodes["n0"].answer(replace(envelope, sender="n3")))

    net.deliver = relay
    results, summer = net.run()
    assert refused == [{"error": "masking requests are taken from the aggregator only"}]
    assert results.contributors["x"] == list(NODES) and not summer.refusals
    assert np.array_equal(results.secure["x"], exact())


@pytest.mark.parametrize("signed", [True, False])
def test_only_forwarded_messages_are_signed_with_a_roster_and_none_without(signed: bool) -> None:
    seen: dict[str, set[int]] = {}

    def record(step: str, replies: dict[str, Any]) -> None:
        for reply in replies.values():
            msg = Message.from_bytes(reply["messages"]["x"].data)
            seen.setdefault(msg.round, set()).add(len(msg.signature))
            if msg.round == "masked":
                peers = Message.from_bytes(b64d(msg.body["peers"], "peers"))
                seen.setdefault("peers", set()).add(len(peers.signature))

    net = Net(signed=signed, tamper=record)
    results, _ = net.run()
    assert np.array_equal(results.secure["x"], exact())
    assert set(seen) == {"shares", "masked", "peers", "consistency", "reveal"}
    for round, lengths in seen.items():
        assert lengths == ({64} if signed and round in FORWARDED else {0}), round
    assert all(node.carrier_authenticated is signed for node in net.nodes.values())


def test_a_flame_run_with_its_roster_signs_point_to_point_messages_once() -> None:
    """Every masking message on the wire of `flame simulate` (throwaway roster): those of
    POINT_TO_POINT rounds carry no inner signature, the forwarded ones do."""
    seen: dict[str, set[int]] = {}

    def inspect(envelope: Envelope) -> bool:
        items: list[Any] = []
        if envelope.kind == "result" and isinstance(envelope.body, dict):
            items = [v for v in envelope.body.get("result", envelope.body).values()]
        elif envelope.category in (MASK, MASKED) and isinstance(envelope.body, dict):
            items = list(envelope.body.get("messages", {}).values())
        for item in items:
            if isinstance(item, Sealed) and item.scheme == "masking":
                msg = Message.from_bytes(item.data)
                seen.setdefault(msg.round, set()).add(len(msg.signature))
        return True

    def analyze(data: Any, epoch: int, previous: Any) -> dict[str, Any]:
        return {"x": flame.secure(VALUES[data.node_id])}

    config = load_config(
        secure={"enabled": True, "scheme": "masking", "bound": 1024.0},
        epoch_timeout=5,
        presence_timeout=20,
    )
    result = flame.simulate(
        analyze,
        lambda results, epoch, previous: results.secure["x"],
        data={v: {"x.csv": "v\n1\n"} for v in NODES},
        config=config,
        broker=MemoryBroker(on_send=inspect),
    )
    assert np.array_equal(result.value, exact())
    assert set(seen) == set(POINT_TO_POINT | FORWARDED) - {"peers"}, seen
    for round, lengths in seen.items():
        assert lengths == ({64} if round in FORWARDED else {0}), round

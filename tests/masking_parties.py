"""Shared set-up of the masking protocol tests: node names, identities, a party (every
node of one session, the honest server, and the server's key to forge messages with), and
a run (the aggregator's MaskingSummer with its nodes in this process)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import flame
from flame.identity import throwaway
from flame.node.context import Received
from flame.protocols.masking import MaskingClient, MaskingServer, Message, Session
from flame.protocols.paillier import SecureSumSpec
from flame.secure.masking import MaskingNode, MaskingSettings
from flame.secure.masking_sum import MaskingSummer

SPEC = SecureSumSpec(precision=16, bound=1024.0, max_nodes=1000)


def nodes(n: int) -> tuple[str, ...]:
    return tuple(f"node{i:03d}" for i in range(n))


def ids_for(members: tuple[str, ...]) -> dict[str, Ed25519PrivateKey]:
    return {v: Ed25519PrivateKey.generate() for v in (*members, "aggregator")}


class Party:
    """Every node of `sess` with `length` random values each (uniform in ±`spread`), the
    honest server (told the length up front when `server_length` is given), and the
    aggregator's signing key, so a test can forge any server message."""

    def __init__(
        self,
        sess: Session,
        *,
        length: int,
        seed: int = 5,
        spread: float = 100.0,
        server_length: int | None = None,
    ) -> None:
        self.sess = sess
        self.length = length
        self.ids = ids_for(sess.participants)
        pubs = {k: v.public_key() for k, v in self.ids.items()}
        self.clients = {
            v: MaskingClient(sess, v, identity=self.ids[v], identities=pubs)
            for v in sess.participants
        }
        self.server = MaskingServer(
            sess, identity=self.ids["aggregator"], identities=pubs, length=server_length
        )
        rng = np.random.default_rng(seed)
        self.values = {v: rng.uniform(-spread, spread, length) for v in sess.participants}

    def forge(self, round: str, body: dict[str, Any]) -> bytes:
        msg = Message(self.sess.binding, round, "aggregator", body)
        return msg.signed(self.ids["aggregator"]).to_bytes()

    def share_keys(self, lengths: dict[str, int] | None = None) -> None:
        """Rounds 0 and 1, honestly relayed: every node advertises and seals its shares
        (for a vector of `lengths[node]` values, default the party's length)."""
        for c in self.clients.values():
            self.server.receive(c.advertise().to_bytes())
        for v, m in self.server.keys().items():
            n = (lengths or {}).get(v, self.length)
            self.server.receive(self.clients[v].share_keys(m.to_bytes(), length=n).to_bytes())


class Run:
    """The aggregator's context for a `MaskingSummer` of one field "x" (throwaway roster,
    carrier-authenticated), the nodes' `MaskingNode`s answering in this process. A test
    replaces a node's sealed result before the sum (`run(results=...)`) or rewrites a
    reply of one round (`tamper(step, replies)`), as a rogue node could."""

    def __init__(
        self,
        members: tuple[str, ...],
        values: dict[str, Any],
        tamper: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.members, self.values, self.tamper = members, values, tamper
        self.settings = MaskingSettings(SecureSumSpec(precision=16, bound=1024.0, max_nodes=100))
        self.auths = throwaway("agg", members)
        self.nodes = {
            v: MaskingNode(self.settings, "ana", v, members, "agg", self.auths[v]) for v in members
        }
        self.analysis_id, self.node_id = "ana", "agg"
        self._mailbox = SimpleNamespace(transport=self)
        self.sent: list[Any] = []

    def send(self, envelope: Any) -> None:
        self.sent.append(envelope)

    def receive(self, category: str, *, senders: Any, timeout: float) -> Any:
        replies = {e.recipient: self.nodes[e.recipient].answer(e) for e in self.sent}
        step = self.sent[0].body["round"]
        self.sent = []
        if self.tamper is not None:
            self.tamper(step, replies)
        return Received(replies, [])

    def sealed(self) -> dict[str, Any]:
        """Every node's honest result of epoch 0: {"x": its sealed advertisement}."""
        return {v: n.seal({"x": flame.secure(self.values[v])}, 0) for v, n in self.nodes.items()}

    def run(self, results: dict[str, Any] | None = None) -> tuple[Any, Any]:
        """(the Results of epoch 0, the summer: its `refusals` name who was left out)."""
        summer = MaskingSummer(self.settings, 5.0, self, self.members, self.auths["agg"])  # type: ignore[arg-type]
        return summer(results if results is not None else self.sealed(), 0), summer

"""Shared set-up of the masking protocol tests: node names, identities, and a party (every
node of one session, the honest server, and the server's key to forge messages with)."""

from __future__ import annotations

from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flame.protocols.masking import MaskingClient, MaskingServer, Message, Session
from flame.protocols.paillier import SecureSumSpec

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

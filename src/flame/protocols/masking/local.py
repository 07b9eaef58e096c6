"""All parties of one masked sum in one process: for tests, benchmarks and `flame simulate`
sessions where every message is passed by hand. Messages go through their wire bytes, so
what is measured and checked is what would travel."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from flame.protocols.masking.client import MaskingClient
from flame.protocols.masking.messages import Message
from flame.protocols.masking.server import MaskedSum, MaskingServer
from flame.protocols.masking.session import Session

__all__ = ["DROP_POINTS", "LocalRun", "run_local"]

DROP_POINTS = ("advertise", "shares", "masked", "consistency", "reveal")
"""A node dropping "at" a point sends nothing from that round on."""


@dataclass
class LocalRun:
    """The sum, and the bytes each direction carried (node -> server, server -> nodes)."""

    result: MaskedSum
    bytes_up: int = 0
    bytes_down: int = 0
    by_round: dict[str, int] = field(default_factory=dict)


def run_local(
    session: Session,
    values: Mapping[str, object],
    *,
    drop: Mapping[str, str] | None = None,
    identities: Mapping[str, Ed25519PrivateKey] | None = None,
    min_contributors: int = 1,
    carrier_authenticated: bool = False,
) -> LocalRun:
    """Run every round; `drop` maps a node to the round at which it goes silent;
    `identities` (private keys of every participant and the server) turns on signing;
    `carrier_authenticated` (with them) leaves the point-to-point messages unsigned, as a
    run whose envelopes are signed does: this process is their carrier, each message handed
    over with its sender."""
    drop = dict(drop or {})
    publics: dict[str, Ed25519PublicKey] | None = None
    if identities is not None:
        publics = {k: v.public_key() for k, v in identities.items()}
    clients = {
        v: MaskingClient(
            session,
            v,
            identity=identities[v] if identities is not None else None,
            identities=publics,
            carrier_authenticated=carrier_authenticated,
        )
        for v in values
    }
    server = MaskingServer(
        session,
        identity=identities[session.server] if identities is not None else None,
        identities=publics,
        min_contributors=min_contributors,
        carrier_authenticated=carrier_authenticated,
    )
    run = LocalRun(result=MaskedSum.__new__(MaskedSum))
    server_id = session.server

    def up(node: str, msg: Message) -> None:
        data = msg.to_bytes()
        run.bytes_up += len(data)
        run.by_round[msg.round] = run.by_round.get(msg.round, 0) + len(data)
        server.receive(data, sender=node)

    def down(messages: Mapping[str, Message]) -> dict[str, bytes]:
        out = {}
        for node, msg in messages.items():
            data = msg.to_bytes()
            run.bytes_down += len(data)
            run.by_round[msg.round] = run.by_round.get(msg.round, 0) + len(data)
            out[node] = data
        return out

    def alive(node: str, point: str) -> bool:
        at = drop.get(node)
        return at is None or DROP_POINTS.index(at) > DROP_POINTS.index(point)

    for v, client in clients.items():
        if alive(v, "advertise"):
            up(v, client.advertise())
    for v, data in down(server.keys()).items():
        if alive(v, "shares"):
            length = int(np.size(values[v]))  # type: ignore[arg-type]
            up(v, clients[v].share_keys(data, length=length, sender=server_id))
    for v, data in down(server.ciphertexts()).items():
        if alive(v, "masked"):
            up(v, clients[v].masked_input(data, values[v], sender=server_id))
    for v, data in down(server.survivors()).items():
        if alive(v, "consistency"):
            up(v, clients[v].consistency(data, sender=server_id))
    for v, data in down(server.unmask()).items():
        if alive(v, "reveal"):
            up(v, clients[v].reveal(data, sender=server_id))
    run.result = server.result()
    return run

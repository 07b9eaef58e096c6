"""Two sessions of the same sum (a restarted run re-running an epoch with fresh keys): what a
node signed in one is not taken in the other. Forwarded statements name their signer's keys
of the session, and the binding names the run."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from masking_parties import SPEC, nodes

from flame.protocols.masking import (
    Binding,
    MaskingClient,
    MaskingServer,
    Message,
    ProtocolViolation,
    Session,
)
from flame.protocols.masking.messages import b64e

NODES = nodes(5)


def _to_consistency(sess: Session, ids: dict[str, Ed25519PrivateKey]) -> tuple[Any, Any, Any]:
    """Every node and the server honestly through rounds 0-2; each node's survivors message."""
    pubs = {k: v.public_key() for k, v in ids.items()}
    clients = {v: MaskingClient(sess, v, identity=ids[v], identities=pubs) for v in NODES}
    server = MaskingServer(sess, identity=ids["aggregator"], identities=pubs)
    for c in clients.values():
        server.receive(c.advertise().to_bytes())
    for v, m in server.keys().items():
        server.receive(clients[v].share_keys(m.to_bytes(), length=3).to_bytes())
    for v, m in server.ciphertexts().items():
        server.receive(clients[v].masked_input(m.to_bytes(), np.ones(3)).to_bytes())
    return clients, server, server.survivors()


def _ids() -> dict[str, Ed25519PrivateKey]:
    return {v: Ed25519PrivateKey.generate() for v in (*NODES, "aggregator")}


def test_a_consistency_signature_of_an_earlier_session_is_refused() -> None:
    """Same binding, same identities, same U3: the signature verifies; the keys it names are
    those of the earlier session, so the server and every node refuse it."""
    sess, ids = Session(Binding("ana", 0, "x"), NODES, 4, SPEC), _ids()
    old_clients, _, old_survivors = _to_consistency(sess, ids)
    old = old_clients[NODES[1]].consistency(old_survivors[NODES[1]].to_bytes())
    clients, server, survivors = _to_consistency(sess, ids)
    with pytest.raises(ProtocolViolation, match="other keys than its signer advertised"):
        server.receive(old.to_bytes())
    signatures = {
        v: b64e(clients[v].consistency(survivors[v].to_bytes()).to_bytes()) for v in NODES
    }
    signatures[NODES[1]] = b64e(old.to_bytes())
    want = [[v, "self"] for v in NODES]
    body = {"u3": list(NODES), "signatures": signatures, "want": want, "masked": {}}
    unmask = Message(sess.binding, "unmask", "aggregator", body).signed(ids["aggregator"])
    with pytest.raises(ProtocolViolation, match="other keys than its signer advertised"):
        clients[NODES[0]].reveal(unmask.to_bytes())


def test_a_message_of_another_run_is_refused_and_the_run_changes_the_keys() -> None:
    """The run id is part of the binding: a signed advertisement of run r1 does not open in
    the session of run r2, and the context every key is derived from differs."""
    ids = _ids()
    pubs = {k: v.public_key() for k, v in ids.items()}
    one, two = (Session(Binding("ana", 0, "x", run), NODES, 4, SPEC) for run in ("r1", "r2"))
    advert = MaskingClient(one, NODES[0], identity=ids[NODES[0]], identities=pubs).advertise()
    assert Message.from_bytes(advert.to_bytes()).binding == one.binding
    server = MaskingServer(two, identity=ids["aggregator"], identities=pubs)
    with pytest.raises(ProtocolViolation, match="another session"):
        server.receive(advert.to_bytes())
    assert one.binding.context() != two.binding.context()
    assert Binding("ana", 0, "x").context() == b'["ana",0,"x"]'  # no run: as before


def test_a_node_binds_the_run_of_its_kick_off_into_what_it_seals() -> None:
    """`MaskingNode.seal(..., run)` (the run the node's kick-off named): the advertisement's
    binding carries it, and sealing the same epoch in another run gives another binding."""
    import flame
    from flame.identity import throwaway
    from flame.protocols.paillier import SecureSumSpec
    from flame.secure.masking import MaskingNode, MaskingSettings

    settings = MaskingSettings(SecureSumSpec(precision=16, bound=1024.0, max_nodes=100))
    auth = throwaway("agg", NODES)[NODES[0]]
    node = MaskingNode(settings, "ana", NODES[0], NODES, "agg", auth)
    bindings = [
        Message.from_bytes(node.seal({"x": flame.secure(np.ones(2))}, 0, run)["x"].data).binding
        for run in ("r1", "r2")
    ]
    assert [b.run for b in bindings] == ["r1", "r2"] and bindings[0] != bindings[1]

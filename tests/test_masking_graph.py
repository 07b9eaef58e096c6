"""The sparse masking graph (SecAgg+): used from SPARSE_FROM nodes on, fixed by the session
alone (a malicious server can neither pick nor bend it), and exact with dropouts."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from masking_parties import SPEC, ids_for, nodes

from flame.protocols.masking import (
    Binding,
    MaskingClient,
    MaskingError,
    MaskingServer,
    Message,
    ProtocolViolation,
    Session,
    run_local,
)
from flame.protocols.masking.graph import SPARSE_FROM, degree_for
from flame.protocols.masking.messages import b64e

BINDING = Binding("ana-graph", 2, "update")


def exact(values: dict[str, Any], keep: list[str]) -> Any:
    return sum(np.rint(values[v] * SPEC.scale).astype(np.int64) for v in keep)


def test_the_graph_is_complete_below_sparse_from_and_sparse_from_it() -> None:
    small = Session(BINDING, nodes(SPARSE_FROM - 1), 67, SPEC)
    assert not small.graph.sparse and small.shares_needed == 67
    assert small.neighbours("node000") == set(nodes(SPARSE_FROM - 1)) - {"node000"}
    big = Session(BINDING, nodes(SPARSE_FROM), 67, SPEC)
    k, t_k = degree_for(SPARSE_FROM) or (0, 0)
    assert big.graph.sparse and big.shares_needed == t_k and 0 < k < SPARSE_FROM // 2
    for v in big.participants:  # k-regular and symmetric
        assert len(big.neighbours(v)) == k and v not in big.neighbours(v)
        assert all(v in big.neighbours(w) for w in big.neighbours(v))
    assert Session(BINDING, nodes(200), 134, SPEC, degree=199).graph.sparse is False


def test_the_graph_is_fixed_by_the_binding_and_participants_alone() -> None:
    """Every party derives the same graph from what is fixed before any key exists; another
    epoch, field or participant list gives another graph, and nothing the server sends
    enters it (the server's own Session is built the same way)."""
    members = nodes(SPARSE_FROM)
    one = Session(BINDING, members, 67, SPEC)
    again = Session(BINDING, tuple(reversed(members)), 67, SPEC, server="someone-else")
    assert all(one.neighbours(v) == again.neighbours(v) for v in members)
    for other in (
        Session(replace(BINDING, epoch=3), members, 67, SPEC),
        Session(replace(BINDING, field="other"), members, 67, SPEC),
        Session(BINDING, (*members[:-1], "node999"), 67, SPEC),
    ):
        assert any(one.neighbours(v) != other.neighbours(v) for v in members[:-1])


def test_100_nodes_with_10_percent_dropping_mid_round_give_the_survivors_exact_sum() -> None:
    members = nodes(100)
    rng = np.random.default_rng(7)
    values = {v: rng.uniform(-100, 100, 100_000) for v in members}
    sess = Session(BINDING, members, 51, SPEC)
    assert sess.graph.sparse
    drop = {v: "masked" for v in members[::10]}  # shared keys, then went silent
    run = run_local(sess, values, drop=drop, identities=ids_for(members))
    survivors = [v for v in members if v not in drop]
    assert run.result.contributors == tuple(survivors)
    assert np.array_equal(run.result.encoded, exact(values, survivors))


def _drive_to_survivors(
    sess: Session, ids: dict[str, Ed25519PrivateKey], silent: set[str]
) -> tuple[dict[str, MaskingClient], MaskingServer]:
    pubs = {k: v.public_key() for k, v in ids.items()}
    clients = {
        v: MaskingClient(sess, v, identity=ids[v], identities=pubs) for v in sess.participants
    }
    server = MaskingServer(sess, identity=ids["aggregator"], identities=pubs)
    for c in clients.values():
        server.receive(c.advertise().to_bytes())
    for v, m in server.keys().items():
        server.receive(clients[v].share_keys(m.to_bytes()).to_bytes())
    rng = np.random.default_rng(1)
    for v, m in server.ciphertexts().items():
        masked = clients[v].masked_input(m.to_bytes(), rng.uniform(-1, 1, 64))
        if v not in silent:
            server.receive(masked.to_bytes())
    for v, m in server.survivors().items():
        server.receive(clients[v].consistency(m.to_bytes()).to_bytes())
    return clients, server


def test_a_server_that_drops_a_victims_neighbours_cannot_unmask_the_victim() -> None:
    """The server leaves every neighbour of one node out of the survivor set (dropped, so
    their pairwise keys would be revealed): the node's input would be exposed by its
    self-mask share. The honest server stops; a lying one that asks anyway is refused by
    every holder of the share."""
    members = nodes(12)
    sess = Session(BINDING, members, 7, SPEC, degree=4)
    victim = members[0]
    ids = ids_for(members)
    clients, server = _drive_to_survivors(sess, ids, set(sess.neighbours(victim)))
    with pytest.raises(MaskingError, match="kept 0 neighbours"):
        server.unmask()
    u3 = [v for v in members if v not in sess.neighbours(victim)]
    signatures = {v: b64e(server._consistency[v].to_bytes()) for v in u3}
    body = {"u3": u3, "signatures": signatures, "want": [[victim, "self"]]}
    ask = Message(BINDING, "unmask", "aggregator", body).signed(ids["aggregator"]).to_bytes()
    holders = sess.holders(victim) & set(u3)
    assert holders == {victim}  # its neighbours are all "dropped": only itself is asked
    for u in holders:
        with pytest.raises(ProtocolViolation, match="kept 0 neighbours"):
            clients[u].reveal(ask)


def test_a_server_cannot_hand_a_node_keys_or_requests_outside_its_neighbourhood() -> None:
    members = nodes(12)
    sess = Session(BINDING, members, 7, SPEC, degree=4)
    ids = ids_for(members)
    pubs = {k: v.public_key() for k, v in ids.items()}
    clients = {
        v: MaskingClient(sess, v, identity=ids[v], identities=pubs) for v in sess.participants
    }
    server = MaskingServer(sess, identity=ids["aggregator"], identities=pubs)
    adverts = {v: c.advertise() for v, c in clients.items()}
    for msg in adverts.values():
        server.receive(msg.to_bytes())
    me = members[0]
    stranger = next(v for v in members if v not in sess.holders(me))
    keys = server.keys()[me]
    widened = {**keys.body["adverts"], stranger: b64e(adverts[stranger].to_bytes())}
    forged = replace(keys, body={"adverts": widened}).signed(ids["aggregator"]).to_bytes()
    with pytest.raises(ProtocolViolation, match="not a neighbour"):
        clients[me].share_keys(forged)


def test_a_sparse_sum_with_dropouts_at_every_round_is_exact() -> None:
    members = nodes(24)
    sess = Session(BINDING, members, 13, SPEC, degree=8)
    rng = np.random.default_rng(3)
    values = {v: rng.uniform(-100, 100, 1000) for v in members}
    drop = {"node001": "shares", "node005": "masked", "node009": "consistency"}
    run = run_local(sess, values, drop=drop, identities=ids_for(members))
    survivors = [v for v in members if drop.get(v) not in ("shares", "masked")]
    assert list(run.result.contributors) == survivors
    assert np.array_equal(run.result.encoded, exact(values, survivors))


def test_a_node_with_too_few_neighbours_left_shares_nothing() -> None:
    """Two of a node's four neighbours never advertise: its shares would go to 3 holders,
    fewer than t_k = 4, so it abandons the sum instead of sharing below the threshold."""
    members = nodes(12)
    sess = Session(BINDING, members, 7, SPEC, degree=4)
    me = members[0]
    silent = set(sorted(sess.neighbours(me))[:2])
    assert sess.shares_needed == 4
    clients = {v: MaskingClient(sess, v) for v in members}
    server = MaskingServer(sess)
    for v, c in clients.items():
        advert = c.advertise()
        if v not in silent:
            server.receive(advert.to_bytes())
    with pytest.raises(MaskingError, match="the shares need 4"):
        clients[me].share_keys(server.keys()[me].to_bytes())

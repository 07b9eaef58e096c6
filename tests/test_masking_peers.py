"""The signed statement of whom a node masked with, and the input length the server fixes:
a lying server that tells one node a different U2 cannot strip its masks, and one node
with another length is refused without locking out the rest."""

from __future__ import annotations

import numpy as np
import pytest
from masking_parties import SPEC, nodes
from masking_parties import Party as _Party

from flame.protocols.masking import (
    Binding,
    MaskingError,
    MaskingServer,
    Message,
    ProtocolViolation,
    Session,
)
from flame.protocols.masking.messages import b64d, b64e

BINDING = Binding("ana-peers", 3, "update")
LENGTH = 8


def Party(sess: Session, *, length: int | None = None) -> _Party:
    """The shared party with this file's vectors (8 values in ±100); `length`: the server's."""
    return _Party(sess, length=LENGTH, server_length=length)


def _lie_about_u2(
    party: Party, victim: str, hidden: str, dropped: str
) -> tuple[list[str], dict[str, str], Message]:
    """The server tells `victim` alone a U2 without its neighbour `hidden` (so it masks with
    one neighbour fewer), then declares another neighbour, `dropped`, gone: U3 holds
    `hidden` but not `dropped`. Returns U3, the consistency signatures, the victim's input."""
    party.share_keys()
    honest = party.server.ciphertexts()
    sealed = party.server._sealed
    u2_victim = [v for v in party.sess.participants if v != hidden]
    peers = party.sess.neighbours(victim) - {hidden}
    body = {"u2": u2_victim, "from": {d: sealed[d][victim] for d in sorted(peers)}}
    masked = {}
    for v, m in honest.items():
        ask = party.forge("ciphertexts", body) if v == victim else m.to_bytes()
        masked[v] = party.clients[v].masked_input(ask, party.values[v])
    u3 = [v for v in party.sess.participants if v != dropped]
    survivors = party.forge("survivors", {"u3": u3})
    signatures = {}
    for v in u3:
        if v != victim:  # the victim refuses: U3 is not inside the U2 it was told
            signatures[v] = b64e(party.clients[v].consistency(survivors).to_bytes())
    return u3, signatures, masked[victim]


@pytest.mark.parametrize("forwarded", ["genuine", "missing", "forged"])
def test_holders_count_the_peers_a_survivor_signed_it_masked_with_not_its_neighbours(
    forwarded: str,
) -> None:
    """Degree 8, t_k = 7: the victim masks with 7 neighbours (its U2 lacks one), one of
    those is declared dropped. 7 of its 8 neighbours are in the signed U3, which the graph
    rule alone accepted; but only 6 of the peers it masked with are, so no holder reveals
    its self-mask share, whatever statement the server forwards."""
    sess = Session(BINDING, nodes(24), 13, SPEC, degree=8)
    assert sess.shares_needed == sess.peers_needed == 7
    party = Party(sess)
    victim = sess.participants[0]
    hidden, dropped = sorted(sess.neighbours(victim))[:2]
    u3, signatures, masked = _lie_about_u2(party, victim, hidden, dropped)
    assert len(sess.neighbours(victim) & set(u3)) == 7
    other = Message(BINDING, "peers", victim, {"skipped": []}).signed(party.ids["aggregator"])
    statements, refusal = {
        "genuine": ({victim: masked.body["peers"]}, "kept 6 neighbours it masked with"),
        "missing": ({}, "no signed statement"),
        "forged": ({victim: b64e(other.to_bytes())}, "bad signature"),
    }[forwarded]
    body = {"u3": u3, "signatures": signatures, "want": [[victim, "self"]], "masked": statements}
    ask = party.forge("unmask", body)
    for h in sorted(sess.neighbours(victim) & set(u3)):
        with pytest.raises(ProtocolViolation, match=refusal):
            party.clients[h].reveal(ask)


def test_a_node_refuses_to_mask_with_fewer_peers_than_needed() -> None:
    """Sparse graph, t_k = 7: a U2 (of t nodes or more) holding 6 of the node's 8
    neighbours is refused before anything is masked."""
    sess = Session(BINDING, nodes(24), 13, SPEC, degree=8)
    party = Party(sess)
    party.share_keys()
    party.server.ciphertexts()
    victim = sess.participants[0]
    keep = sorted(sess.neighbours(victim))[2:]
    u2 = sorted({victim, *keep, *(v for v in sess.participants if v not in sess.holders(victim))})
    body = {"u2": u2, "from": {d: party.server._sealed[d][victim] for d in keep}}
    with pytest.raises(ProtocolViolation, match="6 peers to mask with, fewer than 7"):
        party.clients[victim].masked_input(party.forge("ciphertexts", body), party.values[victim])


def test_the_complete_graph_needs_t_minus_one_surviving_peers() -> None:
    """Complete graph, n = 12, t = 9: the victim is told a U2 of exactly t nodes (8 peers,
    accepted); declaring one of them dropped leaves 7 < t - 1 and the holders refuse."""
    sess = Session(BINDING, nodes(12), 9, SPEC)
    assert not sess.graph.sparse and sess.peers_needed == 8
    party = Party(sess)
    victim = sess.participants[0]
    others = [v for v in sess.participants if v != victim]
    party.share_keys()
    honest = party.server.ciphertexts()
    peers, dropped = others[:8], others[0]
    body = {
        "u2": sorted([victim, *peers]),
        "from": {d: party.server._sealed[d][victim] for d in peers},
    }
    masked = {}
    for v, m in honest.items():
        ask = party.forge("ciphertexts", body) if v == victim else m.to_bytes()
        masked[v] = party.clients[v].masked_input(ask, party.values[v])
    u3 = [v for v in sess.participants if v != dropped]
    survivors = party.forge("survivors", {"u3": u3})
    signatures = {
        v: b64e(party.clients[v].consistency(survivors).to_bytes()) for v in u3 if v != victim
    }
    statements = {victim: masked[victim].body["peers"]}
    body = {"u3": u3, "signatures": signatures, "want": [[victim, "self"]], "masked": statements}
    with pytest.raises(ProtocolViolation, match="kept 7 neighbours it masked with"):
        party.clients[others[-1]].reveal(party.forge("unmask", body))


def test_the_server_refuses_a_statement_that_does_not_match_u2() -> None:
    sess = Session(BINDING, nodes(6), 4, SPEC)
    party = Party(sess)
    party.share_keys()
    liar = sess.participants[0]
    for v, m in party.server.ciphertexts().items():
        msg = party.clients[v].masked_input(m.to_bytes(), party.values[v])
        if v == liar:
            skipped = [sess.participants[1]]
            keys = Message.from_bytes(b64d(msg.body["peers"], "p")).body["keys"]  # its own
            statement = Message(BINDING, "peers", v, {"skipped": skipped, "keys": keys})
            statement = statement.signed(party.ids[v])
            body = {**msg.body, "peers": b64e(statement.to_bytes())}
            msg = Message(BINDING, "masked", v, body, msg.vector).signed(party.ids[v])
            with pytest.raises(ProtocolViolation, match="other nodes than its neighbours in U2"):
                party.server.receive(msg.to_bytes())
        else:
            party.server.receive(msg.to_bytes())
    assert party.server.survivors().keys() == set(sess.participants) - {liar}


def test_a_length_given_up_front_refuses_other_lengths_in_shares_and_input() -> None:
    sess = Session(BINDING, nodes(6), 4, SPEC)
    party = Party(sess, length=LENGTH)
    rogue = sess.participants[0]
    with pytest.raises(ProtocolViolation, match="an input of 3 values, the sum has 8"):
        party.share_keys({rogue: 3})
    with pytest.raises(MaskingError, match="positive"):
        MaskingServer(sess, length=0)


def test_a_node_stating_another_length_is_left_out_and_the_rest_sum_exactly() -> None:
    """No length given up front: the length t nodes stated wins; the node that stated
    another is left out of U2 and the others' sum is exact."""
    sess = Session(BINDING, nodes(6), 4, SPEC)
    party = Party(sess)
    rogue = sess.participants[0]
    party.share_keys({rogue: 3})
    cts = party.server.ciphertexts()
    assert rogue not in cts and party.server.refused == 1
    for v, m in cts.items():
        party.server.receive(
            party.clients[v].masked_input(m.to_bytes(), party.values[v]).to_bytes()
        )
    for v, m in party.server.survivors().items():
        party.server.receive(party.clients[v].consistency(m.to_bytes()).to_bytes())
    for v, m in party.server.unmask().items():
        party.server.receive(party.clients[v].reveal(m.to_bytes()).to_bytes())
    total = party.server.result()
    keep = [v for v in sess.participants if v != rogue]
    want = sum(np.rint(party.values[v] * SPEC.scale).astype(np.int64) for v in keep)
    assert total.contributors == tuple(keep) and np.array_equal(total.encoded, want)


def test_a_wrong_length_with_a_valid_statement_arriving_first_is_refused_alone() -> None:
    """The red team's lock-out, with the rogue's masked input otherwise well formed (its
    signed peer statement included): it stated the right length with its shares, then
    sends 3 values first; it is refused and every honest input is taken."""
    sess = Session(BINDING, nodes(6), 5, SPEC)
    party = Party(sess)
    party.share_keys()
    rogue = sess.participants[0]
    cts = party.server.ciphertexts()
    real = party.clients[rogue].masked_input(cts[rogue].to_bytes(), party.values[rogue])
    body = {**real.body, "length": 3}
    fake = Message(BINDING, "masked", rogue, body, bytes(3 * sess.bits // 8)).signed(
        party.ids[rogue]
    )
    with pytest.raises(ProtocolViolation, match="has 3 values, the sum 8"):
        party.server.receive(fake.to_bytes())
    for v, m in cts.items():
        if v != rogue:
            msg = party.clients[v].masked_input(m.to_bytes(), party.values[v])
            party.server.receive(msg.to_bytes())
    assert party.server.survivors().keys() == set(sess.participants) - {rogue}

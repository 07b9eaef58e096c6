"""Red-team attacks on the masking secure sum (flame.protocols.masking), each test asserting
the CLAIMED secure behaviour: a test that fails is an attack that worked.

Seats: a lying aggregator (it relays and forges every server message, signed with its own
key), a colluding node, the process-wide cache of verified signatures, and a node that
sends what it likes. The honest MaskingServer is used for the rounds the attacker does not
need to bend; the rest are forged the way tests/test_masking*.py forge them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from masking_parties import SPEC, nodes
from masking_parties import Party as _Party

from flame.protocols.masking import (
    Binding,
    MaskingError,
    Message,
    ProtocolViolation,
    RingInput,
    Session,
    decode_sum,
    encode_to_ring,
)
from flame.protocols.masking.agreement import pair_mask_key
from flame.protocols.masking.messages import b64e
from flame.protocols.masking.prg import add_masks
from flame.protocols.masking.session import self_mask_key
from flame.protocols.masking.shamir import combine_bytes
from flame.protocols.paillier import SecureAggregationError

BINDING = Binding("ana-redteam", 5, "update")
LENGTH = 16


def Party(sess: Session, seed: int = 11) -> _Party:
    """The shared party with this file's vectors (16 values in ±1000)."""
    return _Party(sess, length=LENGTH, seed=seed, spread=1000.0)


def _refused(call: Any, *args: Any) -> Any:
    """call(*args), or None when the node refuses (the attack stopped there)."""
    try:
        return call(*args)
    except (ProtocolViolation, MaskingError):
        return None


def _isolate_victim(party: Party, victim: str, fake_dropped: tuple[str, ...]) -> Any:
    """The lying aggregator of attack 1. It tells the victim alone a U2 made of itself, a
    few neighbours it will later call dropped and enough NON-neighbours to reach t (the
    victim cannot check U2), so the victim masks only with `fake_dropped`. Every other node
    hears the true U2. The signed U3 then holds the victim and all its other neighbours
    (so every holder sees >= t_k of its neighbours survive) but not `fake_dropped`: the
    holders reveal the victim's self-mask share and the dropped nodes' pairwise keys,
    which is every mask on the victim's vector. Returns the victim's decoded input, or
    None when some party refused."""
    sess, clients = party.sess, party.clients
    party.share_keys()
    honest_u2 = party.server.ciphertexts()
    outside = [v for v in sess.participants if v not in sess.holders(victim)]
    u2_victim = sorted({victim, *fake_dropped, *outside})
    sealed = party.server._sealed
    masked: dict[str, Message] = {}
    for v, m in honest_u2.items():
        if v in fake_dropped:
            continue  # they "drop" after sharing keys; their shares are with everyone
        if v == victim:
            body = {"u2": u2_victim, "from": {d: sealed[d][victim] for d in fake_dropped}}
            m = Message.from_bytes(party.forge("ciphertexts", body))
        out = _refused(clients[v].masked_input, m.to_bytes(), party.values[v])
        if out is None:
            return None
        masked[v] = out
    u3 = sorted(v for v in sess.participants if v not in fake_dropped)
    survivors = party.forge("survivors", {"u3": u3})
    signatures = {}
    for v in u3:
        sig = _refused(clients[v].consistency, survivors)
        if sig is not None:  # the victim refuses (U3 is not inside its U2): not needed
            signatures[v] = b64e(sig.to_bytes())
    self_shares: dict[int, int] = {}
    pair_shares: dict[str, dict[int, int]] = {d: {} for d in fake_dropped}
    for h in u3:
        if h == victim:
            continue
        want = [[victim, "self"]] if h in sess.neighbours(victim) else []
        want += [[d, "pair"] for d in fake_dropped if h in sess.neighbours(d)]
        if not want or h not in signatures:
            continue
        body = {"u3": u3, "signatures": signatures, "want": want}
        reveal = _refused(clients[h].reveal, party.forge("unmask", body))
        if reveal is None:
            continue
        for node, share in reveal.body["self"].items():
            if node == victim:
                self_shares[sess.index(h)] = int(share, 16)
        for node, share in reveal.body["pair"].items():
            pair_shares[node][sess.index(h)] = int(share, 16)
    t_k = sess.shares_needed
    if len(self_shares) < t_k or any(len(s) < t_k for s in pair_shares.values()):
        return None
    ctx = sess.binding.context()
    seed = combine_bytes(self_shares, t_k)
    masks = [(self_mask_key(seed, ctx, victim), -1)]
    victim_s_pk = party.server._pks[victim][1]
    for d, shares in pair_shares.items():
        s_d = X25519PrivateKey.from_private_bytes(combine_bytes(shares, t_k))
        masks.append((pair_mask_key(s_d, victim_s_pk, ctx, d, victim), -1 if victim < d else 1))
    y = np.frombuffer(masked[victim].vector, dtype="<u8").astype(np.uint64)
    add_masks(y, masks, sess.bits)
    try:
        return decode_sum(y, sess.spec, 1)
    except SecureAggregationError:
        return None  # the masks did not come off: the victim is safe


# --- 1. a lying aggregator on the sparse graph: U2 told differently to one node --------


def test_sparse_graph_aggregator_alone_cannot_unmask_a_victim_by_lying_about_u2() -> None:
    """12 nodes, degree 4 (t_k = 4): U2 for the victim = itself + the 7 non-neighbours
    (8 >= t = 7), so it masks with nobody but itself; its 4 neighbours stay in U3 and
    reveal its self-mask share. Claim: a lying aggregator gets no single node's values."""
    sess = Session(BINDING, nodes(12), 7, SPEC, degree=4)
    party = Party(sess)
    victim = sess.participants[0]
    got = _isolate_victim(party, victim, ())
    truth = encode_to_ring(party.values[victim], SPEC, field="update").view(np.int64)
    assert got is None or not np.array_equal(got, truth), "victim's exact input recovered"


def test_sparse_graph_at_100_nodes_default_degree_victim_input_stays_hidden() -> None:
    """The same at the production default: 100 nodes, t = 67, the automatic graph
    (k = 42, t_k = 32). U2 for the victim = itself + 57 non-neighbours + 9 neighbours
    called dropped (67 = t); U3 = everyone but those 9, so the victim keeps 33 >= t_k
    neighbours and every holder answers. No colluding node is needed."""
    sess = Session(BINDING, nodes(100), 67, SPEC)
    assert sess.graph.sparse and sess.shares_needed == 32
    party = Party(sess, seed=12)
    victim = sess.participants[17]
    fake_dropped = tuple(sorted(sess.neighbours(victim))[:9])
    got = _isolate_victim(party, victim, fake_dropped)
    truth = encode_to_ring(party.values[victim], SPEC, field="update").view(np.int64)
    assert got is None or not np.array_equal(got, truth), "victim's exact input recovered"


def test_complete_graph_u2_lie_does_not_unmask_a_victim() -> None:
    """Guard: the same lie on the complete graph (n = 12, t = 9). The victim's U2 must hold
    t nodes, all of which it masks with; to call them all dropped U3 would shrink below t."""
    sess = Session(BINDING, nodes(12), 9, SPEC)
    party = Party(sess)
    victim = sess.participants[0]
    fake = tuple(v for v in sess.participants if v != victim)[:8]
    got = _isolate_victim(party, victim, fake)
    truth = encode_to_ring(party.values[victim], SPEC, field="update").view(np.int64)
    assert got is None or not np.array_equal(got, truth)


# --- 2. the cache of verified signatures -----------------------------------------------


def _signed_pair() -> tuple[Message, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    msg = Message(BINDING, "masked", "node000", {"length": 2, "bits": 64}, b"\x01" * 16)
    return msg.signed(key), key


@pytest.mark.parametrize(
    "relabel",
    [
        {"binding": replace(BINDING, epoch=6)},
        {"binding": replace(BINDING, field="other")},
        {"binding": replace(BINDING, analysis="ana-other")},
        {"round": "shares"},
        {"sender": "node001"},
        {"body": {"length": 2, "bits": 32}},
        {"vector": b"\x02" * 16},
    ],
)
def test_a_cached_verification_does_not_carry_over_to_a_relabelled_message(
    relabel: dict[str, Any],
) -> None:
    msg, key = _signed_pair()
    msg.verify(key.public_key())  # now in the cache
    msg.verify(key.public_key())  # a hit
    with pytest.raises(ProtocolViolation, match="bad signature"):
        replace(msg, **relabel).verify(key.public_key())


def test_a_cached_verification_under_one_key_does_not_pass_another_key_for_the_same_id() -> None:
    """The server's roster says node000 is key A and verifies (cache); a node whose roster
    says node000 is key B must still refuse the very same bytes."""
    msg, key = _signed_pair()
    msg.verify(key.public_key())
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ProtocolViolation, match="bad signature"):
        Message.from_bytes(msg.to_bytes()).verify(other)


def test_a_bad_signature_is_never_cached() -> None:
    msg, key = _signed_pair()
    forged = replace(msg, signature=bytes(64))
    for _ in range(2):
        with pytest.raises(ProtocolViolation, match="bad signature"):
            forged.verify(key.public_key())


def test_a_node_vector_changed_after_signing_does_not_pass_on_a_cache_hit() -> None:
    """Masked vectors travel as views: bytes altered after the signature was checked once
    must not ride the cached verdict."""
    key = Ed25519PrivateKey.generate()
    buf = bytearray(b"\x05" * 16)
    msg = Message(BINDING, "masked", "node000", {"length": 2, "bits": 64}, memoryview(buf))
    msg = msg.signed(key)
    msg.verify(key.public_key())
    buf[0] ^= 0xFF
    with pytest.raises(ProtocolViolation, match="bad signature"):
        msg.verify(key.public_key())


# --- 3. mask streams are bound to (epoch, field) --------------------------------------


def _masked_vector(binding: Binding, values: Any, seed_session: int = 4) -> np.ndarray:
    sess = Session(binding, nodes(5), 4, SPEC)
    party = Party(sess, seed=seed_session)
    party.values = {v: values for v in sess.participants}
    party.share_keys()
    m = party.server.ciphertexts()["node000"]
    out = party.clients["node000"].masked_input(m.to_bytes(), values)
    return np.frombuffer(out.vector, dtype=np.dtype(sess.dtype).newbyteorder("<")).copy()


def test_two_fields_or_epochs_with_equal_inputs_get_unrelated_masks() -> None:
    values = np.full(LENGTH, 3.5)
    base = _masked_vector(BINDING, values)
    for other in (replace(BINDING, field="other"), replace(BINDING, epoch=6)):
        diff = _masked_vector(other, values) - base
        assert np.count_nonzero(diff) == LENGTH  # no shared stream cancels


# --- 4. bounds and malformed inputs ---------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1024.0 + 2**-10, -1e300])
def test_nan_inf_and_past_bound_values_stop_the_node(bad: float) -> None:
    values = np.zeros(LENGTH)
    values[3] = bad
    with pytest.raises(SecureAggregationError):
        RingInput.encode(values, SPEC, field="update")


def test_values_exactly_at_the_bound_and_negative_zero_sum_exactly() -> None:
    sess = Session(BINDING, nodes(5), 4, SPEC)
    party = Party(sess)
    edge = np.array([1024.0, -1024.0, -0.0, 0.0] * (LENGTH // 4))
    party.values = {v: edge for v in sess.participants}
    party.share_keys()
    for v, m in party.server.ciphertexts().items():
        party.server.receive(party.clients[v].masked_input(m.to_bytes(), edge).to_bytes())
    for v, m in party.server.survivors().items():
        party.server.receive(party.clients[v].consistency(m.to_bytes()).to_bytes())
    for v, m in party.server.unmask().items():
        party.server.receive(party.clients[v].reveal(m.to_bytes()).to_bytes())
    total = party.server.result()
    assert total.values().tolist() == (edge * 5).tolist()


def test_one_node_with_a_wrong_length_cannot_lock_out_the_honest_nodes() -> None:
    """A malicious node sends its masked vector FIRST with another length (signed by
    itself, so it verifies). The server fixes the length from the first arrival, so every
    honest node after it is refused and the sum is abandoned; the claimed behaviour is
    that the vector of the wrong length is the one refused."""
    sess = Session(BINDING, nodes(6), 5, SPEC)
    party = Party(sess)
    party.share_keys()
    bad = "node000"
    cts = party.server.ciphertexts()
    rogue = Message(sess.binding, "masked", bad, {"length": 3, "bits": 64}, bytes(24))
    rogue_bytes = rogue.signed(party.ids[bad]).to_bytes()
    refused_rogue = _refused(party.server.receive, rogue_bytes) is None
    refused_honest = []
    for v, m in cts.items():
        if v == bad:
            continue
        msg = party.clients[v].masked_input(m.to_bytes(), party.values[v])
        if _refused(party.server.receive, msg.to_bytes()) is None:
            refused_honest.append(v)
    assert refused_rogue and refused_honest == []

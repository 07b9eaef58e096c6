"""Pairwise-mask secure aggregation (flame.protocols.masking): exact sums, dropouts at every
round, the refusals that keep a node's input hidden from a lying server, replayed and
relabelled messages, bounds, and the PRG against RFC 8439's test vectors."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from flame.protocols.masking import (
    Binding,
    MaskingClient,
    MaskingError,
    MaskingServer,
    Message,
    ProtocolViolation,
    Session,
    ring_bits,
    run_local,
)
from flame.protocols.masking.local import DROP_POINTS
from flame.protocols.masking.messages import b64e
from flame.protocols.masking.prg import expand_mask, keystream
from flame.protocols.masking.shamir import combine, combine_bytes, split, split_bytes
from flame.protocols.paillier import (
    AggregationOverflowError,
    SecureAggregationError,
    SecureSumSpec,
    ValueOutOfBoundsError,
)

SPEC = SecureSumSpec(precision=16, bound=2.0**15, max_nodes=100)
INT_SPEC = SecureSumSpec(precision=0, bound=2.0**20, max_nodes=100)
BINDING = Binding("ana-1", 3, "weights")
NODES = tuple(f"node-{i}" for i in range(6))


def session(nodes: tuple[str, ...] = NODES, t: int = 4, spec: SecureSumSpec = SPEC) -> Session:
    return Session(BINDING, nodes, t, spec)


def identities(nodes: tuple[str, ...] = NODES) -> dict[str, Ed25519PrivateKey]:
    return {v: Ed25519PrivateKey.generate() for v in (*nodes, "aggregator")}


def inputs(nodes: tuple[str, ...] = NODES, n: int = 257, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {v: rng.uniform(-1000, 1000, n) for v in nodes}


def expected(values: dict[str, Any], spec: SecureSumSpec, keep: set[str]) -> Any:
    return sum(np.rint(np.asarray(values[v]) * spec.scale).astype(np.int64) for v in sorted(keep))


# --- the PRG ------------------------------------------------------------------------------

KEY = bytes(range(32))


def test_chacha20_block_matches_rfc8439_2_3_2() -> None:
    block = bytes.fromhex(
        "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
        "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
    )
    assert keystream(KEY, 64, nonce=bytes.fromhex("000000090000004a00000000"), counter=1) == block


def test_chacha20_encryption_matches_rfc8439_2_4_2() -> None:
    plaintext = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
        b"the future, sunscreen would be it."
    )
    ciphertext = bytes.fromhex(
        "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
        "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
        "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
        "5af90bbf74a35be6b40b8eedf2785e42874d"
    )
    stream = keystream(
        KEY, len(plaintext), nonce=bytes.fromhex("000000000000004a00000000"), counter=1
    )
    assert bytes(a ^ b for a, b in zip(plaintext, stream, strict=True)) == ciphertext


def test_masks_are_the_rfc8439_a1_keystream_as_little_endian_words() -> None:
    stream = bytes.fromhex(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
    )
    words = expand_mask(bytes(32), 8, 64)
    assert words.dtype == np.uint64
    assert words.tolist() == [int.from_bytes(stream[i : i + 8], "little") for i in range(0, 64, 8)]
    assert expand_mask(bytes(32), 16, 32).tolist() == [
        int.from_bytes(stream[i : i + 4], "little") for i in range(0, 64, 4)
    ]


def test_long_masks_are_the_library_keystream_across_chunks() -> None:
    key = bytes(range(1, 33))
    n = (3 << 20) // 8 + 5  # over three 1 MiB chunks, not a multiple of a block
    direct = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * n))
    assert expand_mask(key, n, 64).tobytes() == direct
    assert keystream(key, 8 * n) == direct


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("workers", [1, 3])
def test_add_masks_is_the_sum_of_the_masks_block_by_block(bits: int, workers: int) -> None:
    """add_masks makes each stream a block at a time (streams going on across blocks) and
    may split the masks over threads: the same words as adding whole masks one by one."""
    from flame.protocols.masking.prg import RING_DTYPES, add_masks

    dtype = RING_DTYPES[bits]
    n = (1 << 18) // (bits // 8) * 2 + 7  # over two blocks, not a multiple of a block
    rng = np.random.default_rng(5)
    start = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(dtype)
    masks = [(bytes([i]) * 32, 1 if i % 3 else -1) for i in range(1, 6)]
    expected = start.copy()
    for key, sign in masks:
        mask = expand_mask(key, n, bits)
        expected = expected + mask if sign > 0 else expected - mask
    acc = start.copy()
    add_masks(acc, masks, bits, workers=workers)
    assert acc.dtype == dtype and np.array_equal(acc, expected)


# --- Shamir -------------------------------------------------------------------------------


def test_shamir_any_t_shares_give_the_secret_fewer_do_not() -> None:
    secret = bytes(range(100, 132))
    shares = split_bytes(secret, 3, range(1, 6))
    for subset in ([1, 2, 3], [2, 4, 5], [1, 3, 5, 4]):
        assert combine_bytes({x: shares[x] for x in subset}, 3) == secret
    with pytest.raises(MaskingError, match="3 are needed"):
        combine_bytes({1: shares[1], 2: shares[2]}, 3)


def test_shamir_refuses_an_altered_share() -> None:
    shares = split(12345, 3, range(1, 6))
    shares[5] = (shares[5] + 1) % (1 << 521)
    with pytest.raises(MaskingError, match="altered"):
        combine(shares, 3)


# --- exact sums ---------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [False, True])
def test_fixed_point_sum_is_exact(signed: bool) -> None:
    values = inputs()
    ids = identities() if signed else None
    run = run_local(session(), values, identities=ids)
    assert run.result.contributors == NODES
    assert np.array_equal(run.result.encoded, expected(values, SPEC, set(NODES)))
    plain = sum(values[v] for v in NODES)
    assert np.max(np.abs(run.result.values() - plain)) <= SPEC.max_error(len(NODES)) + 1e-9


def test_integer_sum_is_exact_including_extremes() -> None:
    rng = np.random.default_rng(4)
    values: dict[str, Any] = {v: rng.integers(-(2**20), 2**20, 1000) for v in NODES}
    values[NODES[0]][:2] = [2**20, -(2**20)]
    run = run_local(session(spec=INT_SPEC), values)
    assert run.result.encoded.tolist() == sum(values[v] for v in NODES).tolist()


def test_the_ring_is_sized_for_the_participants_and_their_extremes_sum_exactly() -> None:
    """max_nodes=1000 would need a 64-bit ring; 6 participants fit in 32 bits, and every
    node at +bound (or -bound) still decodes exactly, not wrapped."""
    spec = SecureSumSpec(precision=16, bound=2.0**12, max_nodes=1000)
    assert ring_bits(spec) == 64
    sess = session(spec=spec)
    assert sess.bits == 32 and ring_bits(replace(spec, max_nodes=len(NODES))) == 32
    for sign in (1.0, -1.0):
        values = {v: np.full(100, sign * 2.0**12) for v in NODES}
        run = run_local(sess, values)
        assert run.result.encoded.tolist() == [int(sign * len(NODES) * 2**28)] * 100


def test_masked_input_hides_the_value_and_costs_one_ring_word_per_value() -> None:
    spec = SecureSumSpec(precision=0, bound=10.0, max_nodes=10)  # a 32-bit ring
    sess = session(spec=spec)
    values = {v: np.zeros(1000) for v in NODES}
    run = run_local(sess, values)
    assert sess.bits == 32 and run.result.encoded.tolist() == [0] * 1000
    # masked input: about 4 bytes a value here (8 for the default spec), vs 8 for float64
    assert run.by_round["masked"] / (len(NODES) * 1000) < 4.5


def test_masked_vector_of_zeros_looks_uniform() -> None:
    sess = session()
    clients, server = _start(sess)
    masked = _to_masked(sess, clients, server, {v: np.zeros(4096) for v in NODES})
    words = np.frombuffer(masked[NODES[0]].vector, dtype="<u8")
    assert len(set(words.tolist())) == 4096  # no zero words, no repeats: not the input
    assert 0.45 < float(np.mean(words >> np.uint64(63))) < 0.55


# --- dropouts -----------------------------------------------------------------------------


@pytest.mark.parametrize("point", DROP_POINTS)
def test_a_node_dropping_at_any_round_leaves_the_survivors_exact_sum(point: str) -> None:
    values = inputs(seed=7)
    gone = NODES[2]
    run = run_local(session(), values, drop={gone: point}, identities=identities())
    # the node's masked input counts once it was sent (dropping later only loses its shares)
    counted = set(NODES) - {gone} if point in ("advertise", "shares", "masked") else set(NODES)
    assert set(run.result.contributors) == counted
    assert np.array_equal(run.result.encoded, expected(values, SPEC, counted))


def test_dropouts_at_several_rounds_at_once() -> None:
    nodes = tuple(f"n{i:02d}" for i in range(20))
    values = inputs(nodes, n=100, seed=3)
    drop = {
        "n01": "shares",
        "n05": "masked",
        "n06": "masked",
        "n09": "consistency",
        "n12": "reveal",
    }
    run = run_local(Session(BINDING, nodes, 11, SPEC), values, drop=drop)
    counted = set(nodes) - {"n01", "n05", "n06"}
    assert np.array_equal(run.result.encoded, expected(values, SPEC, counted))


def test_too_many_dropouts_abandon_the_sum() -> None:
    values = inputs()
    drop = {NODES[0]: "masked", NODES[1]: "masked", NODES[2]: "masked"}
    with pytest.raises(MaskingError, match="threshold needs 4"):
        run_local(session(), values, drop=drop)


def test_threshold_must_be_a_strict_majority() -> None:
    with pytest.raises(MaskingError, match="strict majority"):
        session(t=3)
    with pytest.raises(MaskingError, match="strict majority"):
        session(t=7)


# --- a lying server -----------------------------------------------------------------------


def _start(
    sess: Session, ids: dict[str, Ed25519PrivateKey] | None = None
) -> tuple[dict[str, MaskingClient], MaskingServer]:
    pubs = {k: v.public_key() for k, v in ids.items()} if ids else None
    clients = {
        v: MaskingClient(sess, v, identity=ids[v] if ids else None, identities=pubs)
        for v in sess.participants
    }
    server = MaskingServer(sess, identity=ids["aggregator"] if ids else None, identities=pubs)
    return clients, server


def _to_masked(
    sess: Session,
    clients: dict[str, MaskingClient],
    server: MaskingServer,
    values: dict[str, Any],
    skip_masked: tuple[str, ...] = (),
) -> dict[str, Message]:
    for c in clients.values():
        server.receive(c.advertise().to_bytes())
    for v, m in server.keys().items():
        server.receive(clients[v].share_keys(m.to_bytes()).to_bytes())
    masked = {}
    for v, m in server.ciphertexts().items():
        masked[v] = clients[v].masked_input(m.to_bytes(), values[v])
        if v not in skip_masked:
            server.receive(masked[v].to_bytes())
    return masked


def _to_unmask(
    ids: dict[str, Ed25519PrivateKey], dropped: str = NODES[5]
) -> tuple[dict[str, MaskingClient], MaskingServer, dict[str, Message]]:
    sess = session()
    clients, server = _start(sess, ids)
    _to_masked(sess, clients, server, inputs(), skip_masked=(dropped,))
    for v, m in server.survivors().items():
        server.receive(clients[v].consistency(m.to_bytes()).to_bytes())
    return clients, server, server.unmask()


def _forge(ids: dict[str, Ed25519PrivateKey], msg: Message, **body: Any) -> bytes:
    """The server's message with its body changed, signed again with the server's key."""
    return replace(msg, body={**msg.body, **body}).signed(ids["aggregator"]).to_bytes()


def test_the_honest_unmask_request_is_answered() -> None:
    ids = identities()
    clients, _, requests = _to_unmask(ids)
    reply = clients[NODES[0]].reveal(requests[NODES[0]].to_bytes())
    assert set(reply.body["self"]) == set(NODES[:5]) and set(reply.body["pair"]) == {NODES[5]}


def test_a_server_asking_for_both_kinds_of_shares_of_one_node_is_refused() -> None:
    ids = identities()
    clients, _, requests = _to_unmask(ids)
    honest = requests[NODES[0]]
    both = [*honest.body["want"], [NODES[1], "pair"]]
    with pytest.raises(ProtocolViolation, match="asks twice about 'node-1'"):
        clients[NODES[0]].reveal(_forge(ids, honest, want=both))


def test_a_server_asking_for_the_pairwise_share_of_a_survivor_is_refused() -> None:
    ids = identities()
    clients, _, requests = _to_unmask(ids)
    honest = requests[NODES[0]]
    want = [[v, "pair" if v == NODES[1] else k] for v, k in honest.body["want"]]
    with pytest.raises(ProtocolViolation, match="allows only its 'self' share"):
        clients[NODES[0]].reveal(_forge(ids, honest, want=want))


def test_a_server_claiming_a_survivor_dropped_is_refused() -> None:
    """Moving node-1 out of U3 would make its pairwise share 'allowed': the node checks U3
    is the set it signed, and that t nodes signed it."""
    ids = identities()
    clients, _, requests = _to_unmask(ids)
    honest = requests[NODES[0]]
    u3 = [v for v in honest.body["u3"] if v != NODES[1]]
    want = [[v, "self" if v in u3 else "pair"] for v, _ in honest.body["want"]]
    with pytest.raises(ProtocolViolation, match="different survivor set"):
        clients[NODES[0]].reveal(_forge(ids, honest, u3=u3, want=want))


def test_too_few_consistency_signatures_are_refused() -> None:
    ids = identities()
    clients, _, requests = _to_unmask(ids)
    honest = requests[NODES[0]]
    few = dict(list(honest.body["signatures"].items())[:3])
    with pytest.raises(MaskingError, match="consistency signatures"):
        clients[NODES[0]].reveal(_forge(ids, honest, signatures=few))


def test_a_node_answers_one_unmask_request_only() -> None:
    ids = identities()
    clients, _, requests = _to_unmask(ids)
    data = requests[NODES[0]].to_bytes()
    clients[NODES[0]].reveal(data)
    with pytest.raises(ProtocolViolation, match="out of order or replayed"):
        clients[NODES[0]].reveal(data)


def test_the_server_cannot_substitute_a_nodes_keys() -> None:
    ids = identities()
    sess = session()
    clients, server = _start(sess, ids)
    for c in clients.values():
        server.receive(c.advertise())
    keys = server.keys()[NODES[0]]
    fake = MaskingClient(sess, NODES[1]).advertise()  # unsigned keys of the server's choosing
    adverts = {**keys.body["adverts"], NODES[1]: b64e(fake.signed(ids["aggregator"]).to_bytes())}
    with pytest.raises(ProtocolViolation, match="from 'node-1': bad signature"):
        clients[NODES[0]].share_keys(_forge(ids, keys, adverts=adverts))


def test_shares_altered_by_the_server_do_not_open() -> None:
    sess = session()
    clients, server = _start(sess)
    for c in clients.values():
        server.receive(c.advertise())
    for v, m in server.keys().items():
        server.receive(clients[v].share_keys(m))
    msg = server.ciphertexts()[NODES[0]]
    sealed = dict(msg.body["from"])
    sealed[NODES[1]], sealed[NODES[2]] = sealed[NODES[2]], sealed[NODES[1]]
    with pytest.raises(ProtocolViolation, match="do not open"):
        clients[NODES[0]].masked_input(replace(msg, body={**msg.body, "from": sealed}), np.ones(3))


# --- replayed, relabelled, forged messages ------------------------------------------------


def test_a_message_replayed_into_another_epoch_or_field_is_refused() -> None:
    ids = identities()
    pubs = {k: v.public_key() for k, v in ids.items()}
    old = MaskingClient(session(), NODES[0], identity=ids[NODES[0]], identities=pubs).advertise()
    for other in (
        Binding("ana-1", 4, "weights"),
        Binding("ana-1", 3, "bias"),
        Binding("x", 3, "weights"),
    ):
        server = MaskingServer(
            Session(other, NODES, 4, SPEC), identity=ids["aggregator"], identities=pubs
        )
        with pytest.raises(ProtocolViolation, match="another session"):
            server.receive(old.to_bytes())


def test_a_relabelled_message_fails_its_signature() -> None:
    ids = identities()
    pubs = {k: v.public_key() for k, v in ids.items()}
    msg = MaskingClient(session(), NODES[0], identity=ids[NODES[0]], identities=pubs).advertise()
    other = Binding("ana-1", 4, "weights")
    server = MaskingServer(
        Session(other, NODES, 4, SPEC), identity=ids["aggregator"], identities=pubs
    )
    for forged in (replace(msg, binding=other), replace(msg, sender=NODES[1], binding=other)):
        with pytest.raises(ProtocolViolation, match="bad signature"):
            server.receive(forged.to_bytes())


def test_duplicate_wrong_round_and_unsigned_messages_are_refused() -> None:
    ids = identities()
    sess = session()
    clients, server = _start(sess, ids)
    first = clients[NODES[0]].advertise()
    server.receive(first.to_bytes())
    with pytest.raises(ProtocolViolation, match="replayed or duplicate"):
        server.receive(first.to_bytes())
    with pytest.raises(ProtocolViolation, match="'advertise' message from 'node-1' is unsigned"):
        server.receive(replace(clients[NODES[1]].advertise(), signature=b"").to_bytes())
    stray = Message(BINDING, "masked", NODES[2], {"length": 1, "bits": 64}, bytes(8))
    with pytest.raises(ProtocolViolation, match="where a 'advertise' message"):
        server.receive(stray.signed(ids[NODES[2]]).to_bytes())
    outsider = Message(BINDING, "advertise", "intruder", {}).signed(Ed25519PrivateKey.generate())
    with pytest.raises(ProtocolViolation, match="may not send it"):
        server.receive(outsider.to_bytes())
    assert server.refused == 4


def test_a_masked_vector_altered_in_transit_is_refused() -> None:
    ids = identities()
    sess = session()
    clients, server = _start(sess, ids)
    masked = _to_masked(sess, clients, server, inputs(), skip_masked=(NODES[3],))
    vector = bytearray(masked[NODES[3]].vector)
    vector[0] ^= 1
    with pytest.raises(ProtocolViolation, match="bad signature"):
        server.receive(replace(masked[NODES[3]], vector=bytes(vector)).to_bytes())


@pytest.mark.parametrize("cut", [0, 3, 9, 20, -70, -1])
def test_malformed_bytes_are_refused_with_a_reason(cut: int) -> None:
    data = MaskingClient(session(), NODES[0]).advertise().to_bytes()
    with pytest.raises(ProtocolViolation):
        Message.from_bytes(data[:cut])
    with pytest.raises(ProtocolViolation):
        Message.from_bytes(b"XXXX" + data[4:])


# --- bounds -------------------------------------------------------------------------------


def test_a_value_past_its_bound_stops_the_node_before_anything_is_masked() -> None:
    sess = session()
    clients, server = _start(sess)
    values = inputs()
    values[NODES[1]] = np.array(values[NODES[1]])
    values[NODES[1]][5] = 2.0**15 + 1
    with pytest.raises(ValueOutOfBoundsError, match=r"weights\[5\] is outside"):
        _to_masked(sess, clients, server, values)
    assert NODES[1] not in server._got  # nothing of it reached the server


def test_a_node_that_masks_values_past_the_bound_spoils_only_a_refused_sum() -> None:
    """A node is not trusted either: values past what honest nodes can produce, added after
    masking, make the unmasked sum leave its range and it is refused, not returned."""
    sess = session()
    clients, server = _start(sess)
    masked = _to_masked(sess, clients, server, inputs(), skip_masked=(NODES[4],))
    words = np.frombuffer(masked[NODES[4]].vector, dtype="<u8").copy()
    with np.errstate(over="ignore"):  # arithmetic mod 2^64, as the protocol's
        words[0] += np.uint64(1 << 62)
    server.receive(replace(masked[NODES[4]], vector=words.tobytes()))
    for v, m in server.survivors().items():
        server.receive(clients[v].consistency(m))
    for v, m in server.unmask().items():
        server.receive(clients[v].reveal(m))
    with pytest.raises(AggregationOverflowError, match="outside what 6 bounded"):
        server.result()


def test_spec_too_wide_for_a_64_bit_ring_is_refused() -> None:
    with pytest.raises(SecureAggregationError, match="below 2\\*\\*64"):
        Session(BINDING, NODES, 4, SecureSumSpec(precision=40, bound=2.0**21, max_nodes=100))

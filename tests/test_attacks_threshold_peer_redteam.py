"""Red team: ONE colluding analysis node that is also a threshold share holder (T = 2 of 4,
Q = 3), optionally with the broker operator. Real keys and identities, the holders' real
decision code (`ThresholdParty`). A refused attack is a passing test; one that works asserts
the secure behaviour and fails.
"""

from __future__ import annotations

import gmpy2
import numpy as np
import pytest
from test_attacks_quorum import (
    _ask,
    _colluders_endorse,
    _contributions,
    _decrypted,
    _endorse,
    _endorse_body,
    _signed,
    _sum,
    _vector,
)
from test_attacks_threshold import RUN, VALUES, Members, _party

from flame.errors import FlameError
from flame.protocols.paillier import Encryptor, SecureSumSpec
from flame.protocols.paillier.threshold import (
    InvalidPartialError,
    PartialDecryption,
    combine_partials,
    generate_threshold_key,
    partial_decrypt,
    verify_partial,
)
from flame.protocols.paillier.threshold_partial import _prove
from flame.secure.contributions import (
    contribution_body,
    split_body,
    sum_contributions,
    unpack_contribution,
)
from flame.wire.envelope import Envelope


@pytest.fixture(scope="module")
def key():  # type: ignore[no-untyped-def]
    """T = 2 of 4 analysis nodes a, b, c, d (Q = 3); d is the colluder, c the victim."""
    public, shares = generate_threshold_key(512, 2, ["a", "b", "c", "d"])
    return public, {s.node_id: s for s in shares}, Members(["a", "b", "c", "d"])


def test_a_negated_partial_passes_its_proof_but_changes_no_sum(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Colluding holder d sends n**2 - x (x times -1, of order 2). Its old proof fails (the
    transcript hashes the values), but d, holding its share, proves the negated values anew:
    the squared bases cannot see -1, so the proof verifies. Combining raises each partial to
    2*lambda, so the sum is still the true one (no wrong sum, no blame on anyone)."""
    public, shares, members = key
    contributions = _contributions(public, members)
    total, context = _sum(public, members, contributions)
    honest = partial_decrypt(shares["a"], total.ciphertexts, context)
    bad = partial_decrypt(shares["d"], total.ciphertexts, context)
    nsq = public.nsquare
    values = tuple(nsq - x for x in bad.values)
    stale = PartialDecryption(bad.key_id, bad.index, values, bad.challenge, bad.response)
    with pytest.raises(InvalidPartialError):
        verify_partial(public, total.ciphertexts, stale, context)
    cs = [gmpy2.mpz(c) for c in total.ciphertexts]
    e, z = _prove(shares["d"], cs, [gmpy2.mpz(x) for x in values], context)
    flipped = PartialDecryption(bad.key_id, bad.index, values, e, z)
    verify_partial(public, total.ciphertexts, flipped, context)  # accepted: sign-blind
    got = _decrypted(public, members, contributions, [honest, flipped])
    assert got is not None
    assert np.allclose(got, np.sum([VALUES[n] for n in "abc"], axis=0), atol=1e-3)


def test_a_victims_ciphertext_negated_is_no_copy_the_holders_take(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """d contributes n**2 - c_victim: the same plaintext (-1 = (-1)**n is an n-th power),
    different bytes, so the copy check alone would miss it and c's value would count twice.
    d cannot prove it knows the plaintext: refused, naming d."""
    public, shares, members = key
    good = _contributions(public, members, "abc")
    proof, data = split_body(unpack_contribution(good["c"].data)[1])
    from flame.protocols.paillier import EncryptedVector

    victim = EncryptedVector.from_bytes(data, public.paillier)
    negated = EncryptedVector(
        public.paillier,
        victim.layout,
        victim.shape,
        1,
        [public.nsquare - c for c in victim.ciphertexts],
    )
    for i, body_proof in enumerate((proof, b"\x00" * len(proof))):  # c's proof; a zero one
        forged = {
            **good,
            "d": _signed(members, "d", contribution_body(body_proof, negated.to_bytes())),
        }
        make = _party(members, tmp_path / f"neg{i}")
        a, b = make(shares["a"]), make(shares["b"])
        endorsed = _endorse([a, b], forged)
        endorsed += _colluders_endorse(public, members, ["d"], forged)
        assert len(endorsed) == 3  # Q: the endorsement round sees digests, never proofs ...
        reply = _ask(a, forged, endorsed)
        assert "'d'" in reply["error"] and "proof" in reply["error"]  # ... decryption does
        assert "partials" not in reply


def test_a_wider_layout_from_the_colluder_is_not_summed(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """d encodes its vector with a larger max_nodes (other slot widths): a sum over mixed
    layouts would unpack the honest slots wrongly; it is refused."""
    public, shares, members = key
    good = _contributions(public, members, "ab")
    wide = SecureSumSpec(precision=16, bound=2.0**15, max_nodes=10_000)
    vector, opening = Encryptor(public.paillier, workers=1).encrypt_opened([1.0, 2.0], wide)
    forged = {**good, "d": _signed(members, "d", (vector, opening), public=public)}
    party = _party(members, tmp_path / "wide")(shares["a"])
    reply = _ask(party, forged, [])
    assert "error" in reply and "partials" not in reply


def test_one_endorse_request_naming_a_node_twice_is_refused(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The aggregator puts c twice (two digests) in one set to be endorsed: refused."""
    public, shares, members = key
    first = _contributions(public, members, "abc")
    second = _contributions(public, members, "c")
    body = _endorse_body(first)
    body["endorse"]["total"].append(_endorse_body(second)["endorse"]["total"][0])
    party = _party(members, tmp_path / "dup")(shares["b"])
    reply = party.endorse(Envelope(RUN, "aggregator", "x", "message", 0, body))
    assert "error" in reply


def test_an_honest_holder_asked_after_endorsing_another_set_refuses(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Equivocation: colluder d endorses set S1 to honest a and set S2 (same nodes, other
    vectors of d) to honest b; a and b endorse what they are shown. Neither set reaches
    Q = 3 honestly: {a, d} for S1, {b, d} for S2 -> no decryption of either from a or b."""
    public, shares, members = key
    s1 = {
        **_contributions(public, members, "ab"),
        "d": _signed(members, "d", _vector(public, [5.0, 6.0]), public=public),
    }
    s2 = {**s1, "d": _signed(members, "d", _vector(public, [99.0, 99.0]), public=public)}
    make = _party(members, tmp_path / "eq")
    a, b = make(shares["a"]), make(shares["b"])
    e1 = _endorse([a], s1) + _endorse([make(shares["d"])], s1)
    e2 = _endorse([b], s2) + _endorse([make(shares["d"])], s2)
    assert "error" in _ask(a, s1, e1) and "error" in _ask(b, s2, e2)
    assert "error" in _ask(a, s2, e2) and "error" in _ask(b, s1, e1)


def test_a_partial_over_c_1_is_harmless_and_over_n_refused(key) -> None:  # type: ignore[no-untyped-def]
    """A colluding holder's partial over c = 1 (Enc(0) with r = 1) proves nothing useful; the
    combiner still refuses ciphertexts that are not units (n itself)."""
    public, shares, _members = key
    n = gmpy2.mpz(public.n)
    partial = partial_decrypt(shares["a"], [1], b"ctx")
    other = partial_decrypt(shares["b"], [1], b"ctx")
    plain, _ = combine_partials(public, [1], [partial, other], b"ctx")
    assert plain == [0]
    try:
        verify_partial(public, [int(n)], partial_decrypt(shares["a"], [int(n)], b"ctx"), b"ctx")
        refused = False
    except Exception:
        refused = True
    assert refused


def test_a_colluders_other_layout_or_shape_fails_the_epoch_naming_it(key) -> None:  # type: ignore[no-untyped-def]
    """WORKS (blame): d sends a vector under another SecureSumSpec or shape (with a valid
    proof). The aggregator's sum refuses it, but names nobody, unlike a bad proof
    ("fails the epoch naming its node"): an operator cannot tell d from the honest nodes."""
    from flame.protocols.paillier.errors import SpecMismatchError

    public, _shares, members = key
    good = _contributions(public, members, "bc")
    wide = SecureSumSpec(precision=16, bound=2.0**15, max_nodes=10_000)
    enc = Encryptor(public.paillier, workers=1)
    for vector, opening in (enc.encrypt_opened([1.0, 2.0], wide), _vector(public, [1.0] * 3)):
        forged = {**good, "d": _signed(members, "d", (vector, opening), public=public)}
        with pytest.raises(FlameError) as caught:
            sum_contributions(public, RUN, 0, "total", forged, members.verify)
        assert isinstance(caught.value, SpecMismatchError) or "shape" in str(caught.value)
        assert getattr(caught.value, "node", None) == "d", str(caught.value)


def test_the_range_check_boundary_is_exactly_k_times_the_bound(key) -> None:  # type: ignore[no-untyped-def]
    """d, a contributor, picks its whole plaintext. The sum of k = 3 must lie in
    [-k*bound, k*bound]: d reaching exactly +k*bound (or -k*bound) with the others' values is
    accepted (what the threat model says it cannot detect); one unit beyond is refused, also
    below zero via n - x (a "negative" plaintext wraps mod n)."""
    from flame.protocols.paillier import AggregationOverflowError
    from flame.protocols.paillier.encoding import _unpack

    public, shares, _members = key
    spec = SecureSumSpec(precision=0, bound=100.0, max_nodes=3)
    layout = spec.layout(public.paillier)
    enc = Encryptor(public.paillier, workers=1)
    width, top = 8 * layout.slot_bytes, layout.slots_per_ciphertext - 1

    def plain(slots: list[int]) -> int:
        value = sum((v + layout.max_abs) << (width * (top - j)) for j, v in enumerate(slots))
        return value % public.n

    def decrypt(packed: list[int]) -> list[int]:
        cts = [enc.encrypt_raw([p])[0] for p in packed]
        total = int(np.prod(cts, dtype=object) % public.nsquare)
        partials = [partial_decrypt(shares[h], [total], b"ctx") for h in ("a", "b")]
        got, _ = combine_partials(public, [total], partials, b"ctx")
        return [int(x) for x in _unpack(got, layout, 2, 3)]

    honest = plain([10, 20])
    assert decrypt([plain([280, -100]), honest, honest]) == [300, -60]  # d: out of bound
    assert decrypt([plain([-320, 20]), honest, honest]) == [-300, 60]
    with pytest.raises(AggregationOverflowError):
        decrypt([plain([281, 20]), honest, honest])
    with pytest.raises(AggregationOverflowError):
        decrypt([plain([-321, 20]), honest, honest])

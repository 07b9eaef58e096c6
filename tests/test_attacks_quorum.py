"""Red team 3: the endorsement quorum of threshold mode, attacked by (a) the aggregator,
(b) the aggregator with T - 1 colluding share holders, (c) one malicious contributor.

Real keys, real Ed25519 identities and the share holders' real decision code
(`ThresholdParty`), as in test_attacks_threshold. A test that shows a README claim broken
and still open is `xfail(strict=True)` with the reason; the README's threat model says so.
"""

from __future__ import annotations

import hashlib
import itertools
import time
import unicodedata
from typing import Any

import gmpy2
import numpy as np
import pytest
from test_attacks_threshold import RUN, SPEC, VALUES, Members, _party

from flame.errors import FlameError
from flame.protocols.paillier import EncryptedVector, Encryptor
from flame.protocols.paillier.encoding import _unpack
from flame.protocols.paillier.plaintext_proof import Opening, prove
from flame.protocols.paillier.threshold import (
    InvalidPartialError,
    PartialDecryption,
    ThresholdKeyShare,
    ThresholdPublicKey,
    combine_partials,
    generate_threshold_key,
    partial_decrypt,
    verify_partial,
)
from flame.secure.contributions import (
    CONTRIBUTION,
    contribution_body,
    contribution_message,
    pack_contribution,
    proof_context,
    prove_contribution,
    split_body,
    sum_contributions,
    unpack_contribution,
)
from flame.secure.endorse import (
    contribution_pairs,
    endorsement_message,
    quorum_size,
    set_digest,
)
from flame.secure.guard import TAG
from flame.secure.threshold import ThresholdParty, request_context
from flame.wire.envelope import Envelope, Sealed, decode, encode

Contributions = dict[str, Sealed]
Key = tuple[ThresholdPublicKey, dict[str, ThresholdKeyShare], Members]


@pytest.fixture(scope="module")
def key() -> Key:
    """T = 2 of 4 analysis nodes a, b, c, d, which also contribute: Q = 3."""
    public, shares = generate_threshold_key(512, 2, ["a", "b", "c", "d"])
    return public, {s.node_id: s for s in shares}, Members(["a", "b", "c", "d"])


@pytest.fixture(scope="module")
def key5() -> Key:
    """T = 3 of 5 (Q = 4) share holders h1..h5; a, b, c contribute."""
    holders = ["h1", "h2", "h3", "h4", "h5"]
    public, shares = generate_threshold_key(512, 3, holders)
    return public, {s.node_id: s for s in shares}, Members([*VALUES, *holders])


Opened = tuple[EncryptedVector, Opening]


def _vector(public: ThresholdPublicKey, values: list[float]) -> Opened:
    return Encryptor(public.paillier, workers=1).encrypt_opened(values, SPEC)


def _signed(
    members: Members,
    node: str,
    data: bytes | Opened,
    epoch: int = 0,
    path: str = "total",
    public: ThresholdPublicKey | None = None,
) -> Sealed:
    """`node`'s signed contribution: a body as given, or an opened vector with its proof."""
    if not isinstance(data, bytes):
        assert public is not None
        data = prove_contribution(public, RUN, epoch, path, node, *data)
    signature = members.keys[node].sign(contribution_message(RUN, epoch, path, node, data))
    return Sealed(CONTRIBUTION, pack_contribution(signature, data))


def _contributions(
    public: ThresholdPublicKey,
    members: Members,
    nodes: str | list[str] = "abc",
    epoch: int = 0,
    path: str = "total",
) -> Contributions:
    return {n: _signed(members, n, _vector(public, VALUES[n]), epoch, path, public) for n in nodes}


def _endorse_body(contributions: Contributions, path: str = "total") -> dict[str, Any]:
    entries = [
        [node, digest.hex(), unpack_contribution(contributions[node].data)[0].hex()]
        for node, digest in contribution_pairs(path, contributions)
    ]
    return {"endorse": {path: entries}}


def _endorse(
    parties: list[ThresholdParty], contributions: Contributions, epoch: int = 0, path: str = "total"
) -> list[list[str]]:
    got = []
    for party in parties:
        envelope = Envelope(
            RUN, "aggregator", "x", "message", epoch, _endorse_body(contributions, path)
        )
        reply = party.endorse(envelope)
        if "endorsements" in reply:
            got.append([party.share.node_id, reply["endorsements"][path]])
    return got


def _colluders_endorse(
    public: ThresholdPublicKey,
    members: Members,
    malicious: list[str],
    contributions: Contributions,
    epoch: int = 0,
    path: str = "total",
) -> list[list[str]]:
    """What colluding holders sign: anything the aggregator wants."""
    message = endorsement_message(public, RUN, epoch, path, contribution_pairs(path, contributions))
    return [[m, members.keys[m].sign(message).hex()] for m in malicious]


def _ask(
    party: ThresholdParty,
    contributions: Contributions,
    endorsed: list[list[str]],
    epoch: int = 0,
    path: str = "total",
) -> dict[str, Any]:
    body = {"fields": {path: contributions}, "endorsements": {path: endorsed}}
    return party.answer(Envelope(RUN, "aggregator", "x", "message", epoch, body))


def _sum(
    public: ThresholdPublicKey,
    members: Members,
    contributions: Contributions,
    epoch: int = 0,
    path: str = "total",
) -> tuple[EncryptedVector, bytes]:
    total = sum_contributions(public, RUN, epoch, path, contributions, members.verify)
    return total, request_context(RUN, epoch, path, sorted(contributions), total.to_bytes())


def _decrypted(
    public: ThresholdPublicKey,
    members: Members,
    contributions: Contributions,
    partials: list[PartialDecryption],
    epoch: int = 0,
    path: str = "total",
    contributors: int | None = None,
) -> np.ndarray | None:
    """The plaintext sum from verified partials (None with fewer than T)."""
    if len(partials) < public.threshold:
        return None
    total, context = _sum(public, members, contributions, epoch, path)
    plain, _ = combine_partials(public, total.ciphertexts, partials[: public.threshold], context)
    k = total.contributors if contributors is None else contributors
    return np.asarray(_unpack(plain, total.layout, total.size, k) / SPEC.scale)


def _decrypt(
    public: ThresholdPublicKey,
    members: Members,
    honest: list[ThresholdParty],
    contributions: Contributions,
    endorsed: list[list[str]],
    malicious: tuple[str, ...] | list[str] = (),
    shares: dict[str, ThresholdKeyShare] | None = None,
    epoch: int = 0,
    path: str = "total",
) -> np.ndarray | None:
    """Ask `honest` holders to decrypt; colluding holders add their partials unasked."""
    partials = []
    if malicious:
        assert shares is not None
        total, context = _sum(public, members, contributions, epoch, path)
        partials = [partial_decrypt(shares[m], total.ciphertexts, context) for m in malicious]
    for party in honest:
        reply = _ask(party, contributions, endorsed, epoch, path)
        if "partials" in reply:
            partials.append(PartialDecryption.from_bytes(reply["partials"][path].data, public))
    return _decrypted(public, members, contributions, partials, epoch, path)


# --------------------------------------------------------------------------- (a) replay


def test_endorsements_of_another_run_epoch_field_or_key_do_not_count(key, key5, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Real holders' signatures over the same contribution set, but for another analysis,
    epoch, field or key (or under a case-changed holder id), count for nothing."""
    public, shares, members = key
    other_key = key5[0]
    make = _party(members, tmp_path)
    everyone = _contributions(public, members)
    pairs = contribution_pairs("total", everyone)
    d = make(shares["d"])

    def signed_by_abc(message: bytes, ids: str = "abc") -> list[list[str]]:
        return [[i, members.keys[i.lower()].sign(message).hex()] for i in ids]

    replayed = {
        "another analysis": endorsement_message(public, RUN + "-2", 0, "total", pairs),
        "another epoch": endorsement_message(public, RUN, 1, "total", pairs),
        "another field": endorsement_message(public, RUN, 0, "total2", pairs),
        "another key": endorsement_message(other_key, RUN, 0, "total", pairs),
        "another set": endorsement_message(public, RUN, 0, "total", pairs[:2]),
    }
    for what, message in replayed.items():
        reply = _ask(d, everyone, signed_by_abc(message))
        assert "partials" not in reply, what
        assert "0 valid endorsement(s)" in reply["error"], what
    right = endorsement_message(public, RUN, 0, "total", pairs)
    reply = _ask(d, everyone, signed_by_abc(right, "Abc") + [["a", "00" * 64]] * 3)
    assert "2 valid endorsement(s)" in reply["error"]  # 'A' is no holder, a's junk repeats
    reply = _ask(d, everyone, signed_by_abc(right))  # control: the same, signed right
    assert "partials" in reply


def test_partials_replayed_from_another_epoch_or_field_fail_their_proof(key) -> None:  # type: ignore[no-untyped-def]
    public, shares, members = key
    epoch0 = _contributions(public, members, epoch=0)
    total0, context0 = _sum(public, members, epoch0, epoch=0)
    partial = partial_decrypt(shares["a"], total0.ciphertexts, context0)
    verify_partial(public, total0.ciphertexts, partial, context0)  # control
    epoch1 = _contributions(public, members, epoch=1)
    total1, context1 = _sum(public, members, epoch1, epoch=1)
    with pytest.raises(InvalidPartialError):
        verify_partial(public, total1.ciphertexts, partial, context1)
    # the very same ciphertexts in another epoch or field: the proof is bound to the request
    for other in (
        request_context(RUN, 1, "total", sorted(epoch0), total0.to_bytes()),
        request_context(RUN, 0, "total2", sorted(epoch0), total0.to_bytes()),
        request_context(RUN, 0, "total", ["a", "b"], total0.to_bytes()),
    ):
        with pytest.raises(InvalidPartialError):
            verify_partial(public, total0.ciphertexts, partial, other)


# --------------------------------------------------------------------------- (a) encodings


def test_signed_bytes_are_unambiguous_under_renamed_fields_and_nodes(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Contributions signed for field 'é' (NFC) cannot be passed off as 'é' (NFD), 'total ',
    'total\\0', 'Total', nor a's as 'A''s; and tricky (analysis, field, node) strings that
    concatenate alike still give distinct endorsement messages and set digests."""
    public, shares, members = key
    make = _party(members, tmp_path)
    holders = [make(shares[n]) for n in "abcd"]
    nfc = unicodedata.normalize("NFC", "\u00e9")
    signed = _contributions(public, members, path=nfc)
    for path in (unicodedata.normalize("NFD", nfc), nfc + " ", nfc + "\0", nfc.upper()):
        assert path != nfc
        assert _endorse(holders, signed, path=path) == []
    assert len(_endorse(holders, signed, path=nfc)) == 4  # control
    case = dict(signed)
    case["A"] = case.pop("a")
    assert _endorse(holders[:1], case, path=nfc) == []
    d1, d2 = hashlib.sha256(b"1").digest(), hashlib.sha256(b"2").digest()
    sets = [(("ab", d1), ("c", d2)), (("a", d1), ("bc", d2)), (("a\0b", d1), ("c", d2))]
    assert len({set_digest(s) for s in sets}) == len(sets)
    messages = {
        endorsement_message(public, "s", 0, "t/u", sets[0]),
        endorsement_message(public, "s/t", 0, "u", sets[0]),
        endorsement_message(public, "s\0", 0, "t", sets[0]),
        endorsement_message(public, "s", 0, "\0t", sets[0]),
        endorsement_message(public, "s", 10, "t", sets[0]),
        endorsement_message(public, "s", 1, "0t", sets[0]),
    }
    assert len(messages) == 6


# --------------------------------------------------------------------------- (b) epochs


@pytest.mark.parametrize("first", list(itertools.product(("full", "without c"), repeat=3)))
def test_the_guard_holds_across_epochs_with_t_minus_1_colluders(key5, tmp_path, first) -> None:  # type: ignore[no-untyped-def]
    """T = 3 of 5, h3 and h4 collude; ALLOW_CHANGING_CONTRIBUTORS is off. The honest h1, h2,
    h5 are each asked first (epoch 0) for the full set or the set without c, then in epochs
    0 and 1 for both; the contributors' values stay the same. Never are a full sum and a
    sum without c both decrypted, in any epochs."""
    public, shares, members = key5
    malicious, honest = ["h3", "h4"], ["h1", "h2", "h5"]
    make = _party(members, tmp_path)
    parties = {n: make(shares[n]) for n in honest}
    sets = {
        (epoch, name): _contributions(public, members, nodes, epoch)
        for epoch in (0, 1)
        for name, nodes in (("full", "abc"), ("without c", "ab"))
    }
    for node, name in zip(honest, first, strict=True):
        parties[node].endorse(
            Envelope(RUN, "aggregator", node, "message", 0, _endorse_body(sets[(0, name)]))
        )
    decrypted = {}
    for (epoch, name), contributions in sets.items():
        endorsed = _endorse(list(parties.values()), contributions, epoch) + _colluders_endorse(
            public, members, malicious, contributions, epoch
        )
        result = _decrypt(
            public,
            members,
            list(parties.values()),
            contributions,
            endorsed,
            malicious,
            shares,
            epoch,
        )
        assert (result is not None) == (len(endorsed) >= quorum_size(public)), (epoch, name)
        decrypted[(epoch, name)] = result
    full = [v for (_, name), v in decrypted.items() if name == "full" and v is not None]
    reduced = [v for (_, name), v in decrypted.items() if name == "without c" and v is not None]
    assert not (full and reduced), f"c's values: {full[0] - reduced[0]}"
    if first.count("full") >= 2:  # non-vacuous: two honest + two colluders = Q = 4
        assert len(full) == 2 and np.allclose(full[0], np.sum(list(VALUES.values()), axis=0))


def test_two_fields_with_the_same_values_cannot_be_differenced(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An analysis sends one value twice (say 'total' and 'check', or a histogram whose
    counts sum to 'n'): the aggregator gets 'total' over {a, b, c} and 'check' over {a, b}
    endorsed and decrypted by honest holders only (each field's first set)."""
    public, shares, members = key
    make = _party(members, tmp_path)
    holders = [make(shares[n]) for n in "abcd"]
    total = _contributions(public, members, "abc", path="total")
    check = _contributions(public, members, "ab", path="check")
    full = _decrypt(public, members, holders[:2], total, _endorse(holders, total))
    reduced = _decrypt(
        public, members, holders[:2], check, _endorse(holders, check, path="check"), path="check"
    )
    assert full is not None  # the honest path works
    assert reduced is None, f"c's values: {full - reduced}"
    for holder in holders:  # each names the field whose first sum fixed the set
        body = _endorse_body(check, "check")
        reply = holder.endorse(Envelope(RUN, "aggregator", "x", "message", 0, body))
        assert "contributor set of 'total' is fixed by its first sum" in reply["error"], reply


# --------------------------------------------------------------------------- (a) crash, ledger


def test_a_holder_that_crashed_before_replying_keeps_its_word(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The ledger is written before the endorsement or partial leaves; the reply is lost
    (the process dies). The restarted holder endorses and decrypts that set again (the same
    endorsement, a partial that verifies) and refuses any other."""
    public, shares, members = key
    make = _party(members, tmp_path)
    everyone = _contributions(public, members)
    without_c = {n: everyone[n] for n in "ab"}
    lost = _endorse([make(shares["a"])], everyone)  # the reply never reaches the aggregator
    restarted = make(shares["a"])
    assert _endorse([restarted], without_c) == []
    assert _endorse([restarted], everyone) == lost  # Ed25519 is deterministic: same bytes
    endorsed = lost + _endorse([make(shares[n]) for n in "bc"], everyone)
    _ask(make(shares["a"]), everyone, endorsed)  # decrypted, recorded, reply lost again
    again = make(shares["a"])
    assert "partials" not in _ask(again, without_c, endorsed)
    reply = _ask(again, everyone, endorsed)
    partial = PartialDecryption.from_bytes(reply["partials"]["total"].data, public)
    total, context = _sum(public, members, everyone)
    verify_partial(public, total.ciphertexts, partial, context)


_WIPED = pytest.mark.xfail(
    strict=True,
    reason="open (README: protect node storage): wiping ONE honest holder's ledger (two when "
    "n + T is odd), or restarting it without node storage, lets a second set reach Q",
)


@pytest.mark.parametrize(
    "storage",
    [
        pytest.param("wiped", marks=_WIPED),
        "an older copy",  # it fixed a set for another field: the guard spans fields
        pytest.param("memory only", marks=_WIPED),
    ],
)
def test_a_wiped_ledger_does_not_let_a_second_set_through(key, tmp_path, storage) -> None:  # type: ignore[no-untyped-def]
    """T = 2 of 4 (Q = 3), d colludes. The aggregator has a, b (+ d) endorse the full set and
    decrypts it with a (+ d), without asking c. Then a's ledger is gone and a restarted:
    c (never asked), a (forgot) and d endorse the set without c -- Q again. A rolled-back
    copy that holds any earlier sum of the analysis still refuses (one set per analysis);
    only a ledger from before every sum, i.e. a wiped one, lets the set through."""
    public, shares, members = key
    make = _party(members, tmp_path)

    def holder(node: str) -> ThresholdParty:
        if storage == "memory only":
            sign = members.keys[node].sign
            return ThresholdParty(shares[node], members.verify, min_contributors=2, sign=sign)
        return make(shares[node])

    everyone = _contributions(public, members)
    without_c = {n: everyone[n] for n in "ab"}
    a, b = holder("a"), holder("b")
    ledger = tmp_path / "a" / RUN / "nodes" / "a" / "runtime" / TAG  # the runtime's state
    index = tmp_path / "a" / ".flame-index" / RUN / "nodes" / "a" / "runtime" / f"{TAG}.json"
    if storage == "an older copy":  # a's ledger from before 'total' was endorsed
        assert len(_endorse([a], _contributions(public, members, path="n"), path="n")) == 1
        older = ledger.read_bytes(), index.read_bytes()
    endorsed = _endorse([a, b], everyone) + _colluders_endorse(public, members, ["d"], everyone)
    full = _decrypt(public, members, [a], everyone, endorsed, ["d"], shares)
    assert full is not None
    if storage == "wiped":
        ledger.unlink()
    elif storage == "an older copy":
        assert ledger.read_bytes() != older[0]
        ledger.write_bytes(older[0])  # validly authenticated: only its age is wrong
        index.write_bytes(older[1])  # (the store's own index entry, copied alike)
    a, c = holder("a"), holder("c")  # a restarted
    endorsed = _endorse([a, c], without_c) + _colluders_endorse(public, members, ["d"], without_c)
    reduced = _decrypt(public, members, [a, c], without_c, endorsed, ["d"], shares)
    assert reduced is None, f"c's values: {full - reduced}"


# --------------------------------------------------------------------------- (a) layouts


def test_vectors_other_than_the_endorsed_ones_are_refused(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Q endorsed a set; the aggregator sends other bytes under it: a vector with bytes
    appended, two nodes' vectors swapped, a contribution with fewer ciphertexts (signed by
    a colluding contributor who endorsed that set too). No partial leaves."""
    public, shares, members = key
    make = _party(members, tmp_path)
    holders = [make(shares[n]) for n in "abcd"]
    everyone = _contributions(public, members)
    endorsed = _endorse(holders[:3], everyone)
    signature, data = unpack_contribution(everyone["a"].data)
    longer = dict(everyone, a=Sealed(CONTRIBUTION, pack_contribution(signature, data + b"\0")))
    swapped = dict(everyone, a=everyone["b"], b=everyone["a"])
    for changed in (longer, swapped):
        for party in (holders[0], holders[3]):  # one that endorsed, one that did not
            assert "partials" not in _ask(party, changed, endorsed)
    # a contributor (d) signs a vector of another length; Q (d among them) endorse that set
    odd = _contributions(public, members, epoch=1)
    odd["d"] = _signed(members, "d", _vector(public, [1.0] * 40), 1, public=public)
    odd_endorsed = _colluders_endorse(public, members, list("abcd"), odd, 1)
    reply = _ask(_party(members, tmp_path / "fresh")(shares["a"]), odd, odd_endorsed, 1)
    assert "partials" not in reply and "shape" in reply["error"], reply  # d named for it


# --------------------------------------------------------------------------- (a) malformed


def _surrogate_envelope(body: dict[str, Any]) -> Envelope:
    """A lone surrogate travels in the JSON header; the aggregator may send one."""
    return decode(encode(Envelope(RUN, "aggregator", "a", "message", 0, body, "x")))


def test_malformed_or_huge_requests_get_an_error_not_a_crash_or_stall(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    public, shares, members = key
    make = _party(members, tmp_path)
    party = make(shares["a"])
    everyone = _contributions(public, members)
    entries = _endorse_body(everyone)["endorse"]["total"]
    bad = "\ud800"
    endorse_bodies: list[Any] = [
        {"endorse": {bad: entries}},
        {"endorse": {"total": [[bad, entries[0][1], entries[0][2]], *entries[1:]]}},
        {"endorse": {"total": [[f"n{i}", "00" * 32, "00" * 64] for i in range(20000)]}},
        {"endorse": {"x" * 1_000_000: entries}},
        {"endorse": {"total": [[e[0], e[1], "zz"] for e in entries]}},
        {"endorse": {"total": entries * 2}},
        {"endorse": []},
        None,
    ]
    signed = unpack_contribution(everyone["a"].data)[0]
    decrypt_bodies: list[Any] = [
        {"fields": {bad: everyone}},
        {"fields": {"total": {bad: everyone["a"], **everyone}}},
        {"fields": {"total": everyone}, "endorsements": {"total": [["b", "00" * 64]] * 100_000}},
        {"fields": {"total": dict(everyone, a=Sealed(CONTRIBUTION, b"\xff\xff"))}},
        {
            "fields": {
                "total": dict(everyone, a=Sealed(CONTRIBUTION, pack_contribution(signed, b"FL")))
            }
        },
        {"fields": {"total": dict(everyone, a=Sealed("paillier-v1", b""))}},
        {"fields": {"total": [1, 2]}},
        {"fields": {"total": everyone}, "endorsements": [None]},
        "junk",
    ]
    for body in endorse_bodies:
        envelope = _surrogate_envelope({"endorse": body} if body is None else body)
        started = time.monotonic()
        reply = party.endorse(envelope)
        assert "error" in reply and time.monotonic() - started < 5, str(body)[:80]
    for body in decrypt_bodies:
        envelope = _surrogate_envelope(body if isinstance(body, dict) else {"fields": body})
        started = time.monotonic()
        reply = party.answer(envelope)
        assert "error" in reply and time.monotonic() - started < 5, str(body)[:80]
    # the holder still works: the honest rounds after all that
    holders = [party, *(make(shares[n]) for n in "bcd")]
    assert _decrypt(public, members, holders[:2], everyone, _endorse(holders, everyone)) is not None


# --------------------------------------------------------------------------- (c) cancellation


def _inverse_of(public: ThresholdPublicKey, victims: list[bytes]) -> tuple[bytes, list[int]]:
    """A fresh-looking vector whose plaintext is minus the sum of `victims`' (re-randomised:
    no ciphertext equals any other, so the copy check cannot see it), and the re-randomisers
    (all the attacker knows about its randomness)."""
    vectors = [EncryptedVector.from_bytes(v, public.paillier) for v in victims]
    nsquare = gmpy2.mpz(public.nsquare)
    n = gmpy2.mpz(public.n)
    out = []
    rhos = []
    for column in zip(*(v.ciphertexts for v in vectors), strict=True):
        product = gmpy2.mpz(1)
        for c in column:
            product = product * c % nsquare
        rho = 7 + len(out)
        rhos.append(rho)
        r = gmpy2.powmod(gmpy2.mpz(rho), n, nsquare)
        out.append(gmpy2.invert(product, nsquare) * r % nsquare)
    first = vectors[0]
    return EncryptedVector(public.paillier, first.layout, first.shape, 1, out).to_bytes(), rhos


def _forged_bodies(
    public: ThresholdPublicKey, everyone: Contributions, openings: dict[str, Opening]
) -> dict[str, bytes]:
    """What d can send as minus (a + b), having everything but a's and b's randomness (and,
    in the real attack, their plaintexts): a proof from what it knows (plaintexts guessed,
    its re-randomisers), a proof with the true plaintexts (stronger than d can be), a's own
    valid proof transplanted, and no proof at all."""
    proofs = {n: split_body(unpack_contribution(everyone[n].data)[1]) for n in "ab"}
    vector, rhos = _inverse_of(public, [proofs[n][1] for n in "ab"])
    cts = EncryptedVector.from_bytes(vector, public.paillier).ciphertexts
    context = proof_context(public.key_id, RUN, 0, "total", "d")
    randomness = tuple(gmpy2.mpz(r) for r in rhos)
    guessed = Opening(tuple(0 for _ in cts), randomness)
    pairs = zip(openings["a"].plaintexts, openings["b"].plaintexts, strict=True)
    exact = Opening(tuple(-(x + y) % public.n for x, y in pairs), randomness)
    return {
        "a proof from what d knows": contribution_body(
            prove(public.n, cts, guessed, context), vector
        ),
        "d knows the plaintexts but not a's and b's randomness": contribution_body(
            prove(public.n, cts, exact, context), vector
        ),
        "a's proof transplanted": contribution_body(proofs["a"][0], vector),
        "no proof": contribution_body(b"", vector),
    }


def test_one_colluding_holder_contributor_cannot_cancel_others(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """d (a share holder, T - 1 = 1 of them, and an analysis node that contributes) signs
    minus (a + b), re-randomised, so that the decrypted 'sum' would be c's values. The
    honest holders endorse {a, b, c, d} (endorsing sees digests only), but none of them
    releases a partial decryption: d cannot prove it knows its vector's plaintexts, and
    the error names d. The aggregator's own check names d too."""
    public, shares, members = key
    everyone = {}
    openings = {}
    for n in "abc":
        vector, openings[n] = _vector(public, VALUES[n])
        everyone[n] = _signed(members, n, (vector, openings[n]), public=public)
    for i, (what, body) in enumerate(_forged_bodies(public, everyone, openings).items()):
        make = _party(members, tmp_path / f"try{i}")
        holders = [make(shares[n]) for n in "abc"]
        attack = dict(everyone, d=_signed(members, "d", body))
        endorsed = _endorse(holders, attack)
        assert len(endorsed) == 3, what  # Q: every honest holder agreed to the set
        for holder in holders:
            reply = _ask(holder, attack, endorsed)
            assert "partials" not in reply, what
            assert "contribution of 'd'" in reply["error"], (what, reply["error"])
            assert "proof" in reply["error"], (what, reply["error"])
        with pytest.raises(FlameError, match=r"contribution of 'd'.*proof"):
            _sum(public, members, attack)
    # the same set with d's honest contribution decrypts: the refusal is the proof's doing
    make = _party(members, tmp_path / "honest")
    holders = [make(shares[n]) for n in "abc"]
    honest = dict(everyone, d=_signed(members, "d", _vector(public, [0.0, 0.0]), public=public))
    endorsed = _endorse(holders, honest)
    assert "partials" in _ask(holders[0], honest, endorsed)


@pytest.mark.xfail(
    strict=True,
    reason="open (README: min_contributors counts colluders): with min_contributors = 2 the "
    "aggregator makes {victim, colluding holder} a field's first set; the colluder subtracts",
)
def test_a_smallest_first_set_with_one_colluder_does_not_reveal_the_victim(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No trick at all: the aggregator forwards only c's and d's contributions. It is the
    field's first set, of min_contributors = 2 distinct members: every honest holder
    endorses and decrypts it; d knows its own values."""
    public, shares, members = key
    make = _party(members, tmp_path)
    holders = [make(shares[n]) for n in "abc"]
    own = [5.0, 5.0]
    pair = {"c": _contributions(public, members, "c")["c"]}
    pair["d"] = _signed(members, "d", _vector(public, own), public=public)
    endorsed = _endorse(holders, pair)
    assert len(endorsed) == 3
    total = _decrypt(public, members, holders[:1], pair, endorsed, ["d"], shares)
    assert total is not None
    assert not np.allclose(total - own, VALUES["c"], atol=1e-3), f"c's values: {total - own}"

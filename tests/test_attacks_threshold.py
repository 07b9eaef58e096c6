"""Red team: a malicious aggregator against threshold decryption (issue 10).

The aggregator holds every signed contribution of an epoch (it must forward them to the
share holders) and chooses whom to ask for what. The differencing guard, "at most once per
(analysis, epoch, field)" and the endorsement quorum (a holder decrypts only a contribution
set endorsed by Q = ceil((n + T) / 2) holders; each endorses one set per field and epoch)
are what keep it from learning one node's values as the difference of two sums. Here it
tries to get two different sums of one field decrypted with real keys, real Ed25519
signatures and the share holders' real decision code -- also with T - 1 holders on its side.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flame.aggregator.run_store import NodeState
from flame.clients.file_store import FileStore
from flame.protocols.paillier import Encryptor, SecureSumSpec
from flame.protocols.paillier.encoding import _unpack
from flame.protocols.paillier.threshold import (
    PartialDecryption,
    ThresholdKeyShare,
    ThresholdPublicKey,
    combine_partials,
    generate_threshold_key,
    partial_decrypt,
)
from flame.secure.contributions import (
    CONTRIBUTION,
    contribution_message,
    pack_contribution,
    prove_contribution,
    sum_contributions,
    unpack_contribution,
)
from flame.secure.endorse import (
    contribution_pairs,
    endorsement_message,
    quorum_size,
)
from flame.secure.guard import TAG
from flame.secure.threshold import ThresholdParty, request_context
from flame.wire.envelope import Envelope, Sealed

SPEC = SecureSumSpec(precision=16, bound=2.0**15, max_nodes=100)
RUN = "study"
VALUES = {"a": [1.0, 2.0], "b": [10.0, 20.0], "c": [123.25, -7.5]}  # c is the victim


class Members:
    """Ed25519 identities of the analysis members (what the roster gives share holders)."""

    def __init__(self, nodes: list[str]) -> None:
        self.keys = {n: Ed25519PrivateKey.generate() for n in nodes}

    def verify(self, node: str, message: bytes, signature: bytes) -> str | None:
        try:
            self.keys[node].public_key().verify(signature, message)
        except Exception:  # any failure: not this member's signature
            return f"the signature is not {node!r}'s"
        return None


def _contribution(public: ThresholdPublicKey, members: Members, node: str) -> Sealed:
    vector, opening = Encryptor(public.paillier, workers=1).encrypt_opened(VALUES[node], SPEC)
    data = prove_contribution(public, RUN, 0, "total", node, vector, opening)
    signature = members.keys[node].sign(contribution_message(RUN, 0, "total", node, data))
    return Sealed(CONTRIBUTION, pack_contribution(signature, data))


def _endorse_request(contributions: dict[str, Sealed]) -> Envelope:
    """The endorsement round's request: digests and signatures, not the vectors."""
    entries = [
        [node, digest.hex(), unpack_contribution(contributions[node].data)[0].hex()]
        for node, digest in contribution_pairs("total", contributions)
    ]
    return Envelope(RUN, "aggregator", "x", "message", 0, {"endorse": {"total": entries}})


def _endorse(parties: list[ThresholdParty], contributions: dict[str, Sealed]) -> list[list[str]]:
    """The endorsements the aggregator collects by asking `parties` to endorse this set."""
    got = []
    for party in parties:
        reply = party.endorse(_endorse_request(contributions))
        if "endorsements" in reply:
            got.append([party.share.node_id, reply["endorsements"]["total"]])
    return got


def _request(contributions: dict[str, Sealed], endorsed: list[list[str]] | None = None) -> Envelope:
    body = {"fields": {"total": contributions}, "endorsements": {"total": endorsed or []}}
    return Envelope(RUN, "aggregator", "x", "message", 0, body)


def _decrypt(
    public: ThresholdPublicKey,
    members: Members,
    parties: list[ThresholdParty],
    contributions: dict[str, Sealed],
    endorsed: list[list[str]] | None = None,
    endorsers: list[ThresholdParty] | None = None,
) -> np.ndarray | None:
    """What the aggregator learns by asking `parties` to decrypt the sum of `contributions`
    (None if fewer than T of them answer). Without `endorsed` it first asks `endorsers`
    (default: `parties`) to endorse the set, as the honest aggregator asks every holder."""
    if endorsed is None:
        endorsed = _endorse(parties if endorsers is None else endorsers, contributions)
    request = _request(contributions, endorsed)
    partials = []
    for party in parties:
        reply = party.answer(request)
        if "partials" in reply:
            partials.append(PartialDecryption.from_bytes(reply["partials"]["total"].data, public))
    return _combined(public, members, partials, contributions)


def _combined(
    public: ThresholdPublicKey,
    members: Members,
    partials: list[PartialDecryption],
    contributions: dict[str, Sealed],
) -> np.ndarray | None:
    if len(partials) < public.threshold:
        return None
    total = sum_contributions(public, RUN, 0, "total", contributions, members.verify)
    context = request_context(RUN, 0, "total", sorted(contributions), total.to_bytes())
    plain, _ = combine_partials(public, total.ciphertexts, partials[: public.threshold], context)
    return np.asarray(_unpack(plain, total.layout, total.size, total.contributors) / SPEC.scale)


@pytest.fixture(scope="module")
def key() -> tuple[ThresholdPublicKey, dict[str, ThresholdKeyShare], Members]:
    """T = 2 of 4 share holders, so Q = 3 (512-bit: the protocol logic, not the key size,
    is attacked). 2T <= n: two disjoint groups of T holders exist."""
    public, shares = generate_threshold_key(512, 2, ["a", "b", "c", "d"])
    return public, {s.node_id: s for s in shares}, Members(["a", "b", "c", "d"])


def _party(members: Members, folder: Path) -> Callable[[ThresholdKeyShare], ThresholdParty]:
    """A share holder as a real node makes it: its guard ledger in its node-local state under
    `folder` (FLAME_STORAGE__RESULTS_DIR); a new party on the same folder is a restart."""

    def make(share: ThresholdKeyShare) -> ThresholdParty:
        state = NodeState(FileStore(folder / share.node_id), RUN, share.node_id)
        sign = members.keys[share.node_id].sign
        return ThresholdParty(share, members.verify, min_contributors=2, state=state, sign=sign)

    return make


def test_the_aggregator_alone_learns_the_full_sum_only(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Control: the honest path decrypts the sum of a, b and c."""
    public, shares, members = key
    make = _party(members, tmp_path)
    everyone = {n: _contribution(public, members, n) for n in VALUES}
    everybody = [make(shares[n]) for n in "abcd"]
    full = _decrypt(public, members, everybody[:2], everyone, endorsers=everybody)
    assert full is not None
    assert np.allclose(full, np.sum(list(VALUES.values()), axis=0), atol=1e-3)


def test_disjoint_groups_of_holders_cannot_decrypt_two_sums(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """T = 2 of 4: {a, b} and {c, d} are disjoint groups of T. The aggregator gets the full
    set endorsed by some holders, the set without c by the others (each holder is asked
    for both, in every order), and asks {a, b} to decrypt one sum and {c, d} the other."""
    public, shares, members = key
    assert quorum_size(public) == 3
    everyone = {n: _contribution(public, members, n) for n in VALUES}
    without_c = {n: everyone[n] for n in ("a", "b")}
    decrypted_full = 0
    orders = itertools.product((everyone, without_c), repeat=4)  # each holder's first ask
    for case, first in enumerate(orders):
        make = _party(members, tmp_path / str(case))
        holders = {n: make(shares[n]) for n in "abcd"}
        for node, wanted in zip("abcd", first, strict=True):
            holders[node].endorse(_endorse_request(wanted))
        # then everyone is asked for both sets: what it endorses now is all it will endorse
        for_full = _endorse(list(holders.values()), everyone)
        for_reduced = _endorse(list(holders.values()), without_c)
        assert len(for_full) + len(for_reduced) == 4  # nobody endorsed two sets
        endorsed = for_full + for_reduced  # every endorsement it has, for either set
        full = _decrypt(public, members, [holders["a"], holders["b"]], everyone, endorsed)
        partial = _decrypt(public, members, [holders["c"], holders["d"]], without_c, endorsed)
        assert full is None or partial is None, f"c's values: {full - partial}"  # type: ignore[operator]
        decrypted_full += full is not None
        if first == (everyone, everyone, everyone, without_c):  # the honest case and more
            assert full is not None and np.allclose(full, np.sum(list(VALUES.values()), axis=0))
            refusal = holders["d"].answer(_request(without_c, endorsed))["error"]
            assert "1 valid endorsement(s) of this contribution set" in refusal
            assert "3 needed" in refusal
    # non-vacuous: decrypted whenever a, b and one of c, d endorsed the full set first
    assert decrypted_full == 3


@pytest.fixture(scope="module")
def key5() -> tuple[ThresholdPublicKey, dict[str, ThresholdKeyShare], Members]:
    """T = 3 of 5 (Q = 4): T > n/2, yet two groups of T may share only malicious holders."""
    holders = ["h1", "h2", "h3", "h4", "h5"]
    public, shares = generate_threshold_key(512, 3, holders)
    return public, {s.node_id: s for s in shares}, Members([*VALUES, *holders])


@pytest.mark.parametrize("malicious", [["h3"], ["h3", "h4"]])
def test_the_aggregator_with_t_minus_1_holders_cannot_decrypt_two_sums(  # type: ignore[no-untyped-def]
    key5, tmp_path, malicious
) -> None:
    """Up to T - 1 = 2 holders are on the aggregator's side (h3 alone: the issue's groups
    {h1, h2, h3} and {h3, h4, h5}): they endorse every set and decrypt every sum they are
    asked to, with no guard. The honest holders keep their rules; the aggregator asks each
    of them first for the full set or for the set without c (every combination), then for
    both, and has each set decrypted by the honest holders that endorsed it (disjoint
    groups, so "decrypt once" is not what stops it: only the quorum can)."""
    public, shares, members = key5
    q = quorum_size(public)
    assert q == 4
    everyone = {n: _contribution(public, members, n) for n in VALUES}
    without_c = {n: everyone[n] for n in ("a", "b")}
    honest = [n for n in ("h1", "h2", "h3", "h4", "h5") if n not in malicious]

    def malicious_endorsements(contributions: dict[str, Sealed]) -> list[list[str]]:
        pairs = contribution_pairs("total", contributions)
        message = endorsement_message(public, RUN, 0, "total", pairs)
        return [[m, members.keys[m].sign(message).hex()] for m in malicious]

    def malicious_partials(contributions: dict[str, Sealed]) -> list[PartialDecryption]:
        total = sum_contributions(public, RUN, 0, "total", contributions, members.verify)
        context = request_context(RUN, 0, "total", sorted(contributions), total.to_bytes())
        return [partial_decrypt(shares[m], total.ciphertexts, context) for m in malicious]

    decrypted = {"full": 0, "without c": 0}
    orders = itertools.product((everyone, without_c), repeat=len(honest))
    for case, first in enumerate(orders):
        make = _party(members, tmp_path / str(case))
        parties = {n: make(shares[n]) for n in honest}
        for node, wanted in zip(honest, first, strict=True):
            parties[node].endorse(_endorse_request(wanted))
        results = {}
        for name, contributions in (("full", everyone), ("without c", without_c)):
            endorsed = [
                *_endorse(list(parties.values()), contributions),
                *malicious_endorsements(contributions),
            ]
            request = _request(contributions, endorsed)
            partials = malicious_partials(contributions)
            group = [n for n, w in zip(honest, first, strict=True) if w is contributions]
            for node in group:
                reply = parties[node].answer(request)
                if "partials" in reply:
                    data = reply["partials"]["total"].data
                    partials.append(PartialDecryption.from_bytes(data, public))
            results[name] = _combined(public, members, partials, contributions)
            # decrypted exactly when Q holders (its honest endorsers + the malicious) endorsed it
            assert (results[name] is not None) == (len(group) + len(malicious) >= q), (name, case)
            decrypted[name] += results[name] is not None
        full, partial = results["full"], results["without c"]
        assert full is None or partial is None, f"c's values: {full - partial}"  # type: ignore[operator]
    assert decrypted["full"] > 0 and decrypted["without c"] > 0  # non-vacuous


def test_restarted_holders_still_refuse_a_differing_sum(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    public, shares, members = key
    make = _party(members, tmp_path)
    everyone = {n: _contribution(public, members, n) for n in VALUES}
    everybody = [make(shares[n]) for n in "abcd"]
    full = _decrypt(public, members, everybody[:2], everyone, endorsers=everybody)
    restarted = [make(shares[n]) for n in "abcd"]  # the same share files, new processes
    without_c = {n: everyone[n] for n in ("a", "b")}
    partial = _decrypt(public, members, restarted[:2], without_c, endorsers=restarted)
    assert full is not None
    assert partial is None, f"c's values: {full - partial}"
    refusal = restarted[0].answer(_request(without_c))
    assert "contributor set of 'total' is fixed by its first sum" in refusal["error"]
    assert (
        "contributor set of 'total' is fixed"
        in restarted[2].endorse(_endorse_request(without_c))["error"]
    )
    # The same sum again is answered after a restart (the aggregator may lose a reply).
    again = [make(shares[n]) for n in "abcd"]
    assert _decrypt(public, members, again[:2], everyone, endorsers=again) is not None


def test_a_changed_guard_ledger_makes_the_holder_refuse_not_forget(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Tampering with (or corrupting) the persisted ledger never resets the guard."""
    public, shares, members = key
    make = _party(members, tmp_path)
    everyone = {n: _contribution(public, members, n) for n in VALUES}
    everybody = [make(shares[n]) for n in "abcd"]
    assert _decrypt(public, members, everybody[:2], everyone, endorsers=everybody) is not None
    state = NodeState(FileStore(tmp_path / "a"), RUN, "a").reserved()  # the runtime's own
    stored = state.load(TAG)
    state.save(
        TAG, {"body": stored["body"].replace('"a","b","c"', '"a","b"'), "mac": stored["mac"]}
    )
    without_c = {n: everyone[n] for n in ("a", "b")}
    reply = make(shares["a"]).answer(_request(without_c))
    assert "partials" not in reply
    assert "threshold guard ledger" in reply["error"] and "not reset" in reply["error"]
    reply = make(shares["a"]).endorse(_endorse_request(without_c))
    assert "threshold guard ledger" in reply["error"] and "not reset" in reply["error"]
    object_file = tmp_path / "a" / RUN / "nodes" / "a" / "runtime" / TAG
    object_file.write_bytes(b"garbage")  # corrupt on disk: the store's checksum fails
    reply = make(shares["a"]).answer(_request(everyone))
    assert "unreadable" in reply["error"] and "not reset" in reply["error"]


def test_the_same_holders_refuse_a_differing_sum_without_restart(key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    public, shares, members = key
    make = _party(members, tmp_path)
    holders = [make(shares[n]) for n in "abcd"]
    everyone = {n: _contribution(public, members, n) for n in VALUES}
    assert _decrypt(public, members, holders[:2], everyone, endorsers=holders) is not None
    without_c = {n: everyone[n] for n in ("a", "b")}
    assert _decrypt(public, members, holders[:2], without_c, endorsers=holders) is None

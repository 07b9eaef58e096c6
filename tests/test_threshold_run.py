"""Threshold secure sums inside a run, and the attacks a share holder must refuse.

One 2048-bit threshold key (5 shares, T = 3) is dealt once for the module; every run here
uses it. The share holders' decisions are tested directly on `ThresholdParty` with real
Ed25519 signatures; whole runs go through `flame.simulate` (memory broker).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import flame
from flame.config import load_config
from flame.errors import RunFailed
from flame.protocols.paillier import Encryptor, SecureSumSpec
from flame.protocols.paillier.encoding import _unpack
from flame.protocols.paillier.threshold import (
    NotEnoughPartialsError,
    PartialDecryption,
    ThresholdKeyShare,
    ThresholdPublicKey,
    combine_partials,
    generate_threshold_key,
    partial_decrypt,
    verify_partial,
)
from flame.protocols.paillier.threshold_files import load_key_share, write_threshold_key
from flame.secure.contributions import (
    CONTRIBUTION,
    contribution_body,
    contribution_message,
    pack_contribution,
    prove_contribution,
    split_body,
    sum_contributions,
    unpack_contribution,
)
from flame.secure.endorse import contribution_pairs, endorsement_message
from flame.secure.threshold import PARTIAL, ThresholdParty, request_context
from flame.testing import MemoryBroker
from flame.wire.envelope import Envelope, Sealed

MEMBERS = ["a", "b", "c", "d", "e"]
SPEC = SecureSumSpec(precision=16, bound=2.0**15, max_nodes=100)


@pytest.fixture(scope="module")
def tkey(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ThresholdPublicKey]:
    folder = tmp_path_factory.mktemp("tkey")
    public, shares = generate_threshold_key(2048, 3, MEMBERS)
    write_threshold_key(folder, public, shares)
    return folder, public


def shares_of(folder: Path) -> dict[str, ThresholdKeyShare]:
    return {n: load_key_share(folder / f"share-{n}.json", node_id=n) for n in MEMBERS}


def analyze(data, epoch, previous):
    x = np.array([float(v) for v in data.read_text("x.txt").split()])
    return {
        "n": len(x),
        "total": flame.secure(x + epoch),
        "count": flame.secure(len(x), precision=0),
    }


def aggregate(results, epoch, previous):
    return {
        "total": results.secure["total"],
        "count": results.secure["count"],
        "who": results.contributors["total"],
    }


def data_for(nodes: list[str]) -> dict[str, dict[str, str]]:
    return {n: {"x.txt": f"{i + 1.5} {-2.25 * i} {10 * i}"} for i, n in enumerate(nodes)}


def expected_total(nodes: list[str], epoch: int) -> np.ndarray:
    rows = [np.array([i + 1.5, -2.25 * i, 10.0 * i]) + epoch for i in range(len(nodes))]
    return np.sum(rows, axis=0)


def tconfig(folder: Path, **changes: object) -> flame.FlameConfig:
    secure = {"enabled": True, "public_key_file": folder / "public_key.json"}
    secure.update(changes.pop("secure", {}))  # type: ignore[arg-type]
    return load_config(secure=secure, **{"epoch_timeout": 30, "presence_timeout": 30, **changes})


def test_threshold_run_equals_the_plaintext_sums(tkey, caplog) -> None:
    caplog.set_level(logging.INFO)
    folder, _ = tkey
    nodes = MEMBERS
    result = flame.simulate(
        analyze, aggregate, data=data_for(nodes), config=tconfig(folder, epochs=2)
    )
    assert np.allclose(result.value["total"], expected_total(nodes, 1), atol=1e-3, rtol=0)
    assert result.value["count"] == 15 and result.value["who"] == nodes
    assert "decrypted with the partial decryptions of" in caplog.text


def test_a_wrong_partial_is_detected_named_and_outvoted(tkey, caplog, monkeypatch) -> None:
    folder, _ = tkey
    honest = ThresholdParty.answer

    def cheating(self: ThresholdParty, envelope: Envelope) -> dict:
        reply = honest(self, envelope)
        if self.share.node_id != "b" or "partials" not in reply:
            time.sleep(2.0)  # b answers first, so the aggregator must look at its answer
            return reply
        public = self.share.public
        for path, sealed in reply["partials"].items():
            partial = PartialDecryption.from_bytes(sealed.data, public)
            values = list(partial.values)
            values[0] = values[0] * (1 + public.n) % public.nsquare  # shifts the plaintext
            forged = PartialDecryption(
                partial.key_id, partial.index, tuple(values), partial.challenge, partial.response
            )
            reply["partials"][path] = Sealed(PARTIAL, forged.to_bytes(public))
        return reply

    monkeypatch.setattr(ThresholdParty, "answer", cheating)
    caplog.set_level(logging.WARNING)
    result = flame.simulate(analyze, aggregate, data=data_for(MEMBERS), config=tconfig(folder))
    assert np.allclose(result.value["total"], expected_total(MEMBERS, 0), atol=1e-3, rtol=0)
    assert "node b sent a wrong partial decryption" in caplog.text


def test_a_changed_contributor_set_is_refused_naming_the_node(tkey) -> None:
    folder, _ = tkey
    nodes = ["a", "b", "c", "d"]
    drop_c_later = MemoryBroker(
        on_send=lambda e: not (e.kind == "result" and e.sender == "c" and e.epoch == 1)
    )
    config = tconfig(folder, epochs=2, quorum=3, epoch_timeout=3)
    with pytest.raises(RunFailed, match=r"contributor set of 'total' is fixed.*missing c"):
        flame.simulate(analyze, aggregate, data=data_for(nodes), config=config, broker=drop_c_later)
    allowed = tconfig(
        folder, epochs=2, quorum=3, epoch_timeout=3, secure={"allow_changing_contributors": True}
    )
    drop_again = MemoryBroker(
        on_send=lambda e: not (e.kind == "result" and e.sender == "c" and e.epoch == 1)
    )
    result = flame.simulate(
        analyze, aggregate, data=data_for(nodes), config=allowed, broker=drop_again
    )
    assert result.value["who"] == ["a", "b", "d"]


# --- a share holder's decisions, with real signatures --------------------------------------


class Roster:
    """Ed25519 identities of analysis members (what the federation roster provides)."""

    def __init__(self, nodes: list[str]) -> None:
        self.keys = {n: Ed25519PrivateKey.generate() for n in nodes}

    def signer(self, node: str) -> Callable[[bytes], bytes]:
        return self.keys[node].sign

    def verify(self, node: str, message: bytes, signature: bytes) -> str | None:
        key = self.keys.get(node)
        if key is None:
            return f"{node!r} is not an analysis member of the roster"
        try:
            key.public_key().verify(signature, message)
        except InvalidSignature:
            return f"the signature is not {node!r}'s"
        return None


def contribution(
    public: ThresholdPublicKey,
    roster: Roster,
    node: str,
    values: list[float],
    epoch: int = 0,
    path: str = "total",
    signer: str | None = None,
) -> Sealed:
    vector, opening = Encryptor(public.paillier, workers=1).encrypt_opened(values, SPEC)
    data = prove_contribution(public, "run1", epoch, path, node, vector, opening)
    sign = roster.signer(signer or node)
    return Sealed(
        CONTRIBUTION,
        pack_contribution(sign(contribution_message("run1", epoch, path, node, data)), data),
    )


def endorsements(
    public: ThresholdPublicKey, roster: Roster, fields: dict, epoch: int = 0, holders: str = "abcd"
) -> dict:
    """Q (here 4 of 5) holders' endorsements of exactly these sets, signed with their roster
    keys (whatever the sets hold: the decrypting holder must still check them itself)."""
    out = {}
    for path, contributions in fields.items():
        try:
            pairs = contribution_pairs(path, contributions)
        except Exception:  # malformed on purpose: no endorsement can name it
            continue
        message = endorsement_message(public, "run1", epoch, path, pairs)
        out[path] = [[h, roster.signer(h)(message).hex()] for h in holders]
    return out


def request(fields: dict, epoch: int = 0, endorsed: dict | None = None) -> Envelope:
    if endorsed is None:
        endorsed = endorsements(PUBLIC[0], ROSTER[0], fields, epoch) if PUBLIC else {}
    body = {"threshold": 1, "fields": fields, "endorsements": endorsed}
    return Envelope("run1", "aggregator", "a", "message", epoch, body)


PUBLIC: list[ThresholdPublicKey] = []  # the module's key and roster, for request()
ROSTER: list[Roster] = []


@pytest.fixture(scope="module")
def parties(tkey):
    folder, public = tkey
    roster = Roster(MEMBERS)
    shares = shares_of(folder)
    PUBLIC[:], ROSTER[:] = [public], [roster]
    return public, roster, shares


def party(shares, roster, node="a", min_contributors=2, state=None) -> ThresholdParty:
    return ThresholdParty(
        shares[node], roster.verify, min_contributors, state=state, sign=roster.signer(node)
    )


def test_three_honest_parties_decrypt_exactly_the_signed_sum(parties) -> None:
    public, roster, shares = parties
    values = {n: [float(i), -3.5 * i] for i, n in enumerate(["a", "b", "c"])}
    fields = {"total": {n: contribution(public, roster, n, v) for n, v in values.items()}}
    partials = []
    for node in ("c", "d", "e"):  # d and e did not contribute: they may still decrypt
        reply = party(shares, roster, node).answer(request(fields))
        partials.append(PartialDecryption.from_bytes(reply["partials"]["total"].data, public))
    total = sum_contributions(public, "run1", 0, "total", fields["total"], roster.verify)
    context = request_context("run1", 0, "total", ["a", "b", "c"], total.to_bytes())
    plain, _ = combine_partials(public, total.ciphertexts, partials, context)
    sums = _unpack(plain, total.layout, total.size, total.contributors) / SPEC.scale
    assert np.allclose(sums, np.sum(list(values.values()), axis=0), atol=1e-4)


def test_a_single_ciphertext_presented_as_a_sum_is_refused(parties) -> None:
    public, roster, shares = parties
    alone = {"total": {"b": contribution(public, roster, "b", [42.0])}}
    assert "at least 2 distinct nodes" in party(shares, roster).answer(request(alone))["error"]
    # b's vector presented as two contributions (one under c's name) fails c's signature
    b = contribution(public, roster, "b", [42.0])
    twice = {"total": {"b": b, "c": b}}
    assert "signature is not 'c'" in party(shares, roster).answer(request(twice))["error"]
    # a pre-added vector signed by one node claims more than one contribution
    enc = Encryptor(public.paillier, workers=1)
    pre = contribution_body(b"", (enc.encrypt([1.0], SPEC) + enc.encrypt([2.0], SPEC)).to_bytes())
    sig = roster.signer("d")(contribution_message("run1", 0, "total", "d", pre))
    fields = {
        "total": {
            "d": Sealed(CONTRIBUTION, pack_contribution(sig, pre)),
            "e": contribution(public, roster, "e", [1.0]),
        }
    }
    assert "claims to hold 2" in party(shares, roster).answer(request(fields))["error"]


def test_sybil_and_foreign_contributions_are_refused(parties) -> None:
    public, roster, shares = parties
    stranger = Roster(["mallory"])
    fields = {
        "total": {
            "a": contribution(public, roster, "a", [1.0]),
            "mallory": contribution(public, stranger, "mallory", [1.0]),
        }
    }
    assert (
        "'mallory' is not an analysis member"
        in party(shares, roster).answer(request(fields))["error"]
    )
    # b's name, signed with a's key (the aggregator, or a, inventing a second member)
    forged = {
        "total": {
            "a": contribution(public, roster, "a", [1.0]),
            "b": contribution(public, roster, "b", [1.0], signer="a"),
        }
    }
    assert "signature is not 'b'" in party(shares, roster).answer(request(forged))["error"]
    unsigned = {
        "total": {"a": contribution(public, roster, "a", [1.0]), "b": Sealed("paillier", b"x")}
    }
    assert "not a signed one" in party(shares, roster).answer(request(unsigned))["error"]


def test_a_copied_ciphertext_is_refused(parties) -> None:
    public, roster, shares = parties
    a = contribution(public, roster, "a", [5.0])
    data = a.data[2 + 64 :]
    sig = roster.signer("c")(contribution_message("run1", 0, "total", "c", data))
    fields = {
        "total": {
            "a": a,
            "c": Sealed(CONTRIBUTION, pack_contribution(sig, data)),
            "b": contribution(public, roster, "b", [1.0]),
        }
    }
    assert "repeats a ciphertext" in party(shares, roster).answer(request(fields))["error"]


def test_replayed_and_changed_requests(parties) -> None:
    public, roster, shares = parties
    holder = party(shares, roster, "e")
    fields = {"total": {n: contribution(public, roster, n, [1.0]) for n in ("a", "b", "c")}}
    first = holder.answer(request(fields))
    assert holder.answer(request(fields)) == first  # a repeat gets the same answer, no more
    other = {"total": {n: contribution(public, roster, n, [2.0]) for n in ("a", "b", "c")}}
    refusal = holder.answer(request(other))["error"]  # the sum of other vectors, same nodes
    assert "endorsed (or decrypted) a different contribution set of 'total'" in refusal
    # epoch 0's signed contributions replayed as epoch 1's: the signatures do not cover it
    assert "signature is not" in holder.answer(request(fields, epoch=1))["error"]
    # a different set in a later epoch: the differencing guard names the missing node
    later = {"total": {n: contribution(public, roster, n, [1.0], epoch=1) for n in ("a", "b")}}
    assert "missing c" in holder.answer(request(later, epoch=1))["error"]
    new = {"total": {n: contribution(public, roster, n, [1.0], epoch=2) for n in "abcd"}}
    assert "new d" in holder.answer(request(new, epoch=2))["error"]


def test_no_single_partys_files_decrypt_a_contribution(parties, tkey) -> None:
    """One share + the public key + every byte on the broker (contributions, the sums'
    partial decryptions) is not enough to decrypt one node's contribution."""
    public, roster, shares = parties
    values = {n: [float(10 + i)] for i, n in enumerate("abc")}
    fields = {"total": {n: contribution(public, roster, n, v) for n, v in values.items()}}
    captured = []  # the broker capture: requests and the T replies
    for node in ("c", "d", "e"):
        reply = party(shares, roster, node).answer(request(fields))
        captured.append(PartialDecryption.from_bytes(reply["partials"]["total"].data, public))
    # the adversary is node a: its own share, and everything above
    target = split_body(unpack_contribution(fields["total"]["b"].data)[1])[1]
    from flame.protocols.paillier import EncryptedVector

    vector = EncryptedVector.from_bytes(target, public.paillier)
    own = partial_decrypt(shares["a"], vector.ciphertexts, b"anything")
    with pytest.raises(NotEnoughPartialsError):
        combine_partials(public, vector.ciphertexts, [own], b"anything")
    # the captured partials are of the sum, not of b's ciphertext: they fail as partials of it
    for partial in captured:
        with pytest.raises(Exception, match="fails its proof"):
            verify_partial(public, vector.ciphertexts, partial, b"anything")
    # and forcing a combination with them yields garbage, not b's value
    from flame.protocols.paillier.threshold import _combine

    forced = _combine(
        public,
        vector.ciphertexts,
        {own.index: own, captured[0].index: captured[0], captured[1].index: captured[1]},
    )
    slots = int(forced[0]) >> (
        8 * vector.layout.slot_bytes * (vector.layout.slots_per_ciphertext - 1)
    )
    assert abs(slots - vector.layout.max_abs - round(11.0 * SPEC.scale)) > 1000
    folder, _ = tkey
    for name in ("public_key.json", "share-a.json"):
        text = (folder / name).read_text()
        assert '"p"' not in text and '"q"' not in text and '"lambda"' not in text


def test_one_share_alone_is_random_looking(parties) -> None:
    """Sanity: shares are different, full-size numbers (no share equals the secret)."""
    _public, _, shares = parties
    values = {s.secret for s in shares.values()}
    assert len(values) == 5 and all(v.bit_length() > 4000 for v in values)
    assert secrets.compare_digest(b"x", b"x")


def test_obfuscators_are_made_while_waiting_and_used_by_the_epoch(tkey, caplog) -> None:
    from flame.secure.fields import Precomputer, SecureKeys

    folder, _ = tkey
    keys = SecureKeys.from_settings(tconfig(folder).secure, role="aggregation")
    pre = Precomputer(keys)
    before = pre.ready
    pre.fill(before + 6)
    deadline = time.monotonic() + 60
    while pre.ready < before + 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pre.ready >= before + 6
    ready = pre.ready
    # the same cached encryptor serves seal() (with each obfuscator's randomness, which the
    # proof of plaintext knowledge needs): its pool shrinks by what it used
    from flame.protocols.paillier import encrypt_vector
    from flame.protocols.paillier.cipher import _encryptor_for

    encryptor = _encryptor_for(keys.public_key, keys.obfuscation, None)  # type: ignore[arg-type]
    encryptor.encrypt_opened([1.0, 2.0], SPEC)
    assert pre.ready == ready - 1
    encrypt_vector([1.0, 2.0], keys.public_key, SPEC)  # single-key encryption: another pool
    assert pre.ready == ready - 1
    caplog.set_level(logging.INFO)
    config = tconfig(folder, secure={"precompute": pre.ready + 4})  # more than are ready
    result = flame.simulate(analyze, aggregate, data=data_for(MEMBERS), config=config)
    assert np.allclose(result.value["total"], expected_total(MEMBERS, 0), atol=1e-3, rtol=0)
    assert "precomputed" in caplog.text


def test_a_subset_is_asked_first_and_replaced_when_it_cheats_or_stalls(
    tkey, caplog, monkeypatch
) -> None:
    folder, _ = tkey
    honest = ThresholdParty.answer

    def flaky(self: ThresholdParty, envelope: Envelope) -> dict:
        node = self.share.node_id
        if node == "a":
            time.sleep(4.0)  # slow: the aggregator stops waiting for it after timeout / 4
        if node == "b":
            return {"error": "not today"}
        return honest(self, envelope)

    monkeypatch.setattr(ThresholdParty, "answer", flaky)
    caplog.set_level(logging.INFO)
    config = tconfig(folder, epoch_timeout=8, secure={"decrypters": 3})
    result = flame.simulate(analyze, aggregate, data=data_for(MEMBERS), config=config)
    assert np.allclose(result.value["total"], expected_total(MEMBERS, 0), atol=1e-3, rtol=0)
    assert "asking 3 share holders" in caplog.text and "b refused to decrypt" in caplog.text
    assert "within 2 s; asking the other holders" in caplog.text  # a (at least) was slow
    used = next(
        r.getMessage() for r in caplog.records if "decrypted with the partial" in r.getMessage()
    )
    assert "b" not in used.rsplit(" of ", 1)[1].split(", ")  # the refusing holder is not used


def test_threshold_key_configuration_is_checked(tkey, tmp_path) -> None:
    from flame.errors import ConfigError
    from flame.protocols.paillier import KeyFileError, write_keypair
    from flame.secure.fields import SecureKeys

    folder, public = tkey
    share = folder / "share-b.json"
    agg = load_config(
        secure={
            "enabled": True,
            "public_key_file": folder / "public_key.json",
            "key_share_file": share,
        }
    ).secure
    with pytest.raises(ConfigError, match="aggregation node must not hold a key share"):
        SecureKeys.from_settings(agg, role="aggregation")
    node = load_config(secure={"enabled": True, "key_share_file": share}).secure
    assert SecureKeys.from_settings(node, role="analysis", node_id="b").threshold == public
    with pytest.raises(KeyFileError, match="belongs to 'b', not to 'c'"):
        SecureKeys.from_settings(node, role="analysis", node_id="c")
    single = write_keypair(tmp_path, 2048)
    both = load_config(
        secure={"enabled": True, "key_share_file": share, "private_key_file": single[1]}
    ).secure
    with pytest.raises(ConfigError, match="not used with a threshold key"):
        SecureKeys.from_settings(both, role="analysis", node_id="b")
    no_share = load_config(
        secure={"enabled": True, "public_key_file": folder / "public_key.json"}
    ).secure
    with pytest.raises(ConfigError, match=r"KEY_SHARE_FILE.*required"):
        SecureKeys.from_settings(no_share, role="analysis", node_id="b")
    plain_agg = load_config(secure={"enabled": True, "public_key_file": single[0]}).secure
    assert SecureKeys.from_settings(plain_agg, role="aggregation").threshold is None


def test_what_the_range_check_on_a_sum_detects_and_what_it_cannot(parties) -> None:
    """A carry that pushes a slot outside what k honest values can make is refused; an
    out-of-bound contribution whose sum stays in range is not detected (README says so)."""
    from flame.protocols.paillier import AggregationOverflowError

    public, _roster, shares = parties
    spec = SecureSumSpec(precision=0, bound=100.0, max_nodes=3)
    layout = spec.layout(public.paillier)
    enc = Encryptor(public.paillier, workers=1)

    width = 8 * layout.slot_bytes
    top = layout.slots_per_ciphertext - 1

    def malicious(slots: list[int]) -> list[int]:
        """A node encrypting any plaintext it likes: biased slots, as one integer mod n."""
        value = sum((v + layout.max_abs) << (width * (top - j)) for j, v in enumerate(slots))
        return [value % public.n]

    def decrypt(packed: list[list[int]]) -> np.ndarray:
        cts = [enc.encrypt_raw(p) for p in packed]
        total = [
            int(np.prod([c[k] for c in cts], dtype=object) % public.nsquare)
            for k in range(len(cts[0]))
        ]
        partials = [partial_decrypt(shares[n], total, b"ctx") for n in ("a", "b", "c")]
        plain, _ = combine_partials(public, total, partials, b"ctx")
        return _unpack(plain, layout, 2, len(packed))

    honest = malicious([10, 20])
    assert list(decrypt([honest, honest, honest])) == [30, 60]
    # +250 and -250 from two colluding nodes: out of bound, but the sum is in range
    assert list(decrypt([malicious([250, 20]), malicious([-250, 20]), honest])) == [10, 60]
    # a carry from slot 1 into slot 0 (slot 1 gets a whole slot width more): undetected
    carry = malicious([10, 20 + (1 << width)])
    assert list(decrypt([carry, honest, honest])) == [31, 60]
    # a slot pushed past what 3 honest values can make: refused
    with pytest.raises(AggregationOverflowError, match="outside the range"):
        decrypt([malicious([10, 20 + 1000]), honest, honest])
    with pytest.raises(AggregationOverflowError):
        decrypt([malicious([-400, 20]), honest, honest])  # wraps modulo n


def test_malformed_requests_get_an_error_not_a_crash(parties) -> None:
    public, roster, shares = parties
    holder = party(shares, roster, "c")
    good = contribution(public, roster, "a", [1.0])
    for body in (
        None,
        {"fields": "x"},
        {"fields": {}},
        {"fields": {"total": {1: good, "a": good}}},
        {"fields": {"total": {"a": good, "b": Sealed(CONTRIBUTION, b"\x00")}}},
        {"fields": {"total": {"a": good, "b": Sealed(CONTRIBUTION, b"\x00\x01x" + b"FLPV")}}},
        {"fields": {"total": {"a": good, "b": "not sealed"}}},
    ):
        envelope = Envelope("run1", "aggregator", "c", "message", 0, body)
        assert "error" in holder.answer(envelope)


# --- the endorsement quorum (Q = ceil((5 + 3) / 2) = 4) -------------------------------------


def endorse_request(fields: dict, epoch: int = 0) -> Envelope:
    """The endorsement round: each contribution's digest and signature, not its vector."""
    from flame.secure.contributions import unpack_contribution

    body = {
        "endorse": {
            path: [
                [node, digest.hex(), unpack_contribution(contributions[node].data)[0].hex()]
                for node, digest in contribution_pairs(path, contributions)
            ]
            for path, contributions in fields.items()
        }
    }
    return Envelope("run1", "aggregator", "a", "message", epoch, body)


def test_fewer_than_q_endorsements_and_forged_ones_do_not_count(parties) -> None:
    from flame.secure.endorse import quorum_size

    public, roster, shares = parties
    assert quorum_size(public) == 4
    fields = {"total": {n: contribution(public, roster, n, [1.0, 2.0]) for n in "abc"}}
    holder = party(shares, roster, "e")
    three = endorsements(public, roster, fields, holders="abc")["total"]
    refusal = holder.answer(request(fields, endorsed={"total": three}))["error"]
    assert "3 valid endorsement(s) of this contribution set" in refusal and "4 needed" in refusal

    def signed(node: str, key: str, epoch: int = 0, path: str = "total", who: str = "abc"):
        subset = {n: fields["total"][n] for n in who}
        pairs = contribution_pairs("total", subset)
        message = endorsement_message(public, "run1", epoch, path, pairs)
        return [node, extra[key].sign(message).hex()]

    extra = {**roster.keys, "f": Ed25519PrivateKey.generate()}
    extra["aggregator"] = Ed25519PrivateKey.generate()
    members = Roster([])
    members.keys = extra  # f: an analysis member with no share; the aggregator: no share
    checker = ThresholdParty(shares["e"], members.verify, 2, sign=extra["e"].sign)
    forged = {
        "d's name, a's key": (signed("d", "a"), "the signature is not 'd'"),
        "a member holding no share": (signed("f", "f"), "f: holds no share of this key"),
        "the aggregator": (signed("aggregator", "aggregator"), "aggregator: holds no share"),
        "another epoch": (signed("d", "d", epoch=1), "the signature is not 'd'"),
        "another field": (signed("d", "d", path="count"), "the signature is not 'd'"),
        "another set": (signed("d", "d", who="ab"), "the signature is not 'd'"),
        "a duplicate": (three[0], "a: a duplicate"),
        "garbage": (["d", "zz"], "d: a malformed signature"),
    }
    for what, (entry, reason) in forged.items():
        reply = checker.answer(request(fields, endorsed={"total": [*three, entry]}))
        assert "partials" not in reply, what
        assert "3 valid endorsement(s)" in reply["error"] and reason in reply["error"], what
    reply = checker.answer(request(fields, endorsed={"total": [*three, signed("d", "d")]}))
    assert "partials" in reply  # the fourth, genuine endorsement is what was missing


def test_a_holder_endorses_one_set_per_field_and_epoch_even_restarted(parties, tmp_path) -> None:
    from flame.aggregator.run_store import NodeState
    from flame.clients.file_store import FileStore

    public, roster, shares = parties

    def holder() -> ThresholdParty:  # the same node-local state: a restart
        return party(shares, roster, "e", state=NodeState(FileStore(tmp_path), "run1", "e"))

    full = {"total": {n: contribution(public, roster, n, [3.0]) for n in "abc"}}
    other = {"total": {n: contribution(public, roster, n, [4.0]) for n in "abc"}}
    first = holder().endorse(endorse_request(full))
    assert set(first) == {"endorsements"}
    restarted = holder()
    assert (
        "already endorsed (or decrypted) a different contribution set"
        in restarted.endorse(endorse_request(other))["error"]
    )
    assert restarted.endorse(endorse_request(full)) == first  # the same set: the same answer
    assert holder().endorse(endorse_request(full)) == first
    # Q endorsements of the other set elsewhere do not make this holder decrypt it
    assert (
        "this node endorsed (or decrypted) a different contribution set"
        in holder().answer(request(other))["error"]
    )
    assert "partials" in holder().answer(request(full))
    # a holder that decrypted a set it had not endorsed (it was down then) endorses only it
    late = party(shares, roster, "d")
    assert "partials" in late.answer(request(full, endorsed=endorsements(public, roster, full)))
    assert "different contribution set" in late.endorse(endorse_request(other))["error"]
    assert late.endorse(endorse_request(full)) == {
        "endorsements": {
            "total": roster.signer("d")(
                endorsement_message(
                    public, "run1", 0, "total", contribution_pairs("total", full["total"])
                )
            ).hex()
        }
    }
    # what a holder checks before endorsing: signatures (over the digests), enough nodes
    forged = {"total": {**full["total"], "b": contribution(public, roster, "b", [3.0], signer="a")}}
    assert (
        "signature is not 'b'"
        in party(shares, roster, "d").endorse(endorse_request(forged))["error"]
    )
    alone = {"total": {"a": full["total"]["a"]}}
    assert (
        "at least 2 distinct nodes"
        in party(shares, roster, "d").endorse(endorse_request(alone))["error"]
    )
    unsigned = ThresholdParty(shares["d"], None, 2)
    assert "unsigned run" in unsigned.endorse(endorse_request(full))["error"]


def test_an_unsigned_holder_decrypts_without_endorsements(parties, caplog) -> None:
    """No roster: endorsements cannot be checked; the holder warns and keeps its own rules."""
    public, roster, shares = parties
    fields = {"total": {n: contribution(public, roster, n, [1.0]) for n in "ab"}}
    caplog.set_level(logging.WARNING)
    reply = ThresholdParty(shares["c"], None, 2).answer(request(fields, endorsed={}))
    assert "partials" in reply and "without checking" in caplog.text


def test_fewer_than_q_endorsers_fail_the_run_naming_q_and_who(tkey, monkeypatch) -> None:
    folder, _ = tkey
    honest = ThresholdParty.endorse

    def reluctant(self: ThresholdParty, envelope: Envelope) -> dict:
        if self.share.node_id in ("b", "d"):
            return {"error": "not today"}
        return honest(self, envelope)

    monkeypatch.setattr(ThresholdParty, "endorse", reluctant)
    with pytest.raises(RunFailed) as failed:
        flame.simulate(analyze, aggregate, data=data_for(MEMBERS), config=tconfig(folder))
    message = str(failed.value)
    assert "3 of 5 share holders endorsed the contribution set of" in message
    assert "Q = 4 are needed" in message and "endorsed by a, c, e" in message
    assert "b: not today; d: not today" in message


def test_a_ledger_written_before_endorsements_still_loads_and_guards(parties) -> None:
    """Ledgers persisted before the endorsement round (no "endorsed" part) keep working."""
    import json

    from flame.secure.guard import TAG, GuardLedger

    public, roster, shares = parties

    class State(dict):
        def save(self, tag: str, value: object) -> None:
            self[tag] = value

        def load(self, tag: str, default: object = None) -> object:
            return self.get(tag, default)

    state = State()
    old = GuardLedger(shares["e"], state)
    body = json.dumps(
        {
            "version": 1,
            "node": "e",
            "index": shares["e"].index,
            "fixed": {"run1": {"total": ["a", "b", "c"]}},
            "answered": {"run1": {"0/total": "00" * 32}},
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    state[TAG] = {"body": body, "mac": old._mac(body)}
    holder = party(shares, roster, "e", state=state)
    fields = {"total": {n: contribution(public, roster, n, [1.0]) for n in "abc"}}
    assert "already decrypted a different sum" in holder.answer(request(fields))["error"]
    later = {"total": {n: contribution(public, roster, n, [1.0], epoch=1) for n in "ab"}}
    assert "missing c" in holder.endorse(endorse_request(later, epoch=1))["error"]
    # which set it decrypted in epoch 0 is not recorded: it endorses none for that epoch
    assert "already decrypted a sum of 'total'" in holder.endorse(endorse_request(fields))["error"]


def test_a_contribution_without_a_valid_proof_fails_the_epoch_naming_its_node(
    tkey, monkeypatch
) -> None:
    """c's proof of plaintext knowledge is broken (as for a vector derived from others'
    ciphertexts): the aggregator's own check stops the epoch before any holder is asked."""
    from flame.secure import contributions as st

    folder, _ = tkey
    honest = st.prove_contribution

    def broken(public, analysis, epoch, path, node, vector, opening):  # type: ignore[no-untyped-def]
        body = honest(public, analysis, epoch, path, node, vector, opening)
        proof, data = st.split_body(body)
        if node != "c":
            return body
        return st.contribution_body(proof[:-1] + bytes([proof[-1] ^ 1]), data)

    monkeypatch.setattr(st, "prove_contribution", broken)
    with pytest.raises(RunFailed, match=r"contribution of 'c' to 'total'.*proof") as failed:
        flame.simulate(analyze, aggregate, data=data_for(MEMBERS), config=tconfig(folder))
    assert failed.value.node == "c"


def test_a_contribution_of_an_older_flame_is_refused_by_name(parties) -> None:
    """The format without proofs ("paillier-t1") is not mistaken for garbage: the error says
    every node must run the same flame version."""
    public, roster, shares = parties
    a = contribution(public, roster, "a", [1.0])
    old = Sealed("paillier-t1", a.data)
    fields = {"total": {"a": a, "b": old}}
    error = party(shares, roster).answer(request(fields))["error"]
    assert "'b'" in error and "'paillier-t1' of an older flame" in error

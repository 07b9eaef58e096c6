"""Threshold Paillier: dealing, partial decryption with proofs, combining, key files, CLI.

Keys are small (512-bit n from cached 256-bit safe primes) so the tests stay fast; the
arithmetic does not depend on the size. One test makes a 2048-bit key through the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import stat
from pathlib import Path

import gmpy2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from phe.paillier import PaillierPrivateKey, PaillierPublicKey

from flame.cli.keys import keys_cli
from flame.protocols.paillier import (
    Encryptor,
    InsecureKeyError,
    KeyFileError,
    KeyMismatchError,
    SecureSumSpec,
    WireFormatError,
    decrypt_raw,
    decrypt_vector,
    load_public_key,
)
from flame.protocols.paillier.encoding import _unpack
from flame.protocols.paillier.safe_primes import generate_safe_prime, is_safe_prime
from flame.protocols.paillier.threshold import (
    InvalidPartialError,
    NotEnoughPartialsError,
    PartialDecryption,
    ThresholdKeyShare,
    ThresholdPublicKey,
    combine_partials,
    deal,
    lagrange_at_zero,
    partial_decrypt,
    verify_partial,
)
from flame.protocols.paillier.threshold_files import (
    load_key_share,
    load_threshold_public_key,
    write_threshold_key,
)

CTX = b"analysis a1 | epoch 3 | field total | contributors n1,n2,n3"


@pytest.fixture(scope="session")
def safe_primes() -> list[int]:
    """Four 256-bit safe primes, made once per session (a few ms each)."""
    primes: list[int] = []
    while len(primes) < 4:
        p = int(generate_safe_prime(256))
        if p not in primes:
            primes.append(p)
    return primes


def _members(count: int) -> list[str]:
    return [f"node{i}" for i in range(1, count + 1)]


def _single_key(p: int, q: int) -> PaillierPrivateKey:
    """The dealer's secret as an ordinary private key: the cross-check oracle."""
    return PaillierPrivateKey(PaillierPublicKey(p * q), p, q)


def test_safe_primes_are_safe_and_full_size(safe_primes: list[int]) -> None:
    for p in safe_primes:
        assert is_safe_prime(p) and p.bit_length() == 256 and p % 4 == 3
    p, q = safe_primes[:2]
    # the DJN conditions the README states: p = q = 3 mod 4 and gcd(p - 1, q - 1) = 2
    assert gmpy2.gcd(p - 1, q - 1) == 2
    assert (p * q).bit_length() == 512


def test_threshold_decryption_equals_single_key_decryption(safe_primes: list[int]) -> None:
    p, q = safe_primes[:2]
    public, shares = deal(p, q, 3, _members(5))
    oracle = _single_key(p, q)
    plaintexts = [0, 1, public.n - 1, *(secrets.randbelow(public.n) for _ in range(20))]
    ciphertexts = Encryptor(public.paillier, workers=1).encrypt_raw(plaintexts)
    assert decrypt_raw(oracle, ciphertexts) == plaintexts
    partials = [partial_decrypt(s, ciphertexts, CTX) for s in shares[1:4]]
    combined, invalid = combine_partials(public, ciphertexts, partials, CTX)
    assert [int(m) for m in combined] == decrypt_raw(oracle, ciphertexts) and invalid == []


def test_packed_vectors_sum_and_decrypt_like_the_single_key_mode(safe_primes: list[int]) -> None:
    p, q = safe_primes[2:4]
    public, shares = deal(p, q, 2, _members(3))
    spec = SecureSumSpec(precision=16, bound=1000.0, max_nodes=10)
    rng = np.random.default_rng(7)
    vectors = [rng.uniform(-1000, 1000, 37) for _ in range(3)]
    enc = Encryptor(public.paillier, workers=1)
    total = sum(enc.encrypt(v, spec) for v in vectors)
    expected = decrypt_vector(total, _single_key(p, q), spec, min_contributors=1)
    partials = [partial_decrypt(s, total.ciphertexts, CTX) for s in (shares[2], shares[0])]
    plain, _ = combine_partials(public, total.ciphertexts, partials, CTX)
    sums = _unpack(plain, total.layout, total.size, total.contributors) / spec.scale
    assert np.array_equal(sums, expected)
    assert np.abs(sums - sum(vectors)).max() <= spec.max_error(3)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    parties=st.integers(1, 7),
    data=st.data(),
)
def test_any_t_of_l_shares_decrypt(
    safe_primes: list[int], parties: int, data: st.DataObject
) -> None:
    threshold = data.draw(st.integers(1, parties), label="threshold")
    p, q = safe_primes[0], safe_primes[3]
    public, shares = deal(p, q, threshold, _members(parties))
    values = data.draw(st.lists(st.integers(0, public.n - 1), min_size=1, max_size=4))
    chosen = data.draw(st.permutations(shares), label="order")[:threshold]
    ciphertexts = Encryptor(public.paillier, workers=1).encrypt_raw(values)
    partials = [partial_decrypt(s, ciphertexts, CTX) for s in chosen]
    combined, _ = combine_partials(public, ciphertexts, partials, CTX)
    assert [int(m) for m in combined] == values
    if threshold > 1:  # one share fewer decrypts nothing
        with pytest.raises(NotEnoughPartialsError):
            combine_partials(public, ciphertexts, partials[:-1], CTX)


def test_fewer_than_t_shares_give_no_plaintext(safe_primes: list[int]) -> None:
    """Forcing a combination of T - 1 partials (Lagrange over the smaller set) is garbage."""
    p, q = safe_primes[:2]
    public, shares = deal(p, q, 3, _members(5))
    plaintexts = [secrets.randbelow(public.n) for _ in range(5)]
    ciphertexts = Encryptor(public.paillier, workers=1).encrypt_raw(plaintexts)
    partials = {s.index: partial_decrypt(s, ciphertexts, CTX) for s in shares[:2]}
    from flame.protocols.paillier.threshold import _combine

    assert [int(m) for m in _combine(public, [gmpy2.mpz(c) for c in ciphertexts], partials)] != (
        plaintexts
    )


def test_a_wrong_partial_is_detected_and_named(safe_primes: list[int]) -> None:
    p, q = safe_primes[:2]
    public, shares = deal(p, q, 3, _members(5))
    plaintexts = [secrets.randbelow(public.n) for _ in range(6)]
    ciphertexts = Encryptor(public.paillier, workers=1).encrypt_raw(plaintexts)
    honest = [partial_decrypt(s, ciphertexts, CTX) for s in shares]
    # node2 multiplies one value by (1 + n): the combined plaintext would shift silently
    bad_values = list(honest[1].values)
    bad_values[4] = bad_values[4] * (1 + public.n) % public.nsquare
    cheat = dataclasses.replace(honest[1], values=tuple(bad_values))
    with pytest.raises(InvalidPartialError, match="node2") as info:
        verify_partial(public, ciphertexts, cheat, CTX)
    assert info.value.node_id == "node2"
    combined, invalid = combine_partials(public, ciphertexts, [honest[0], cheat, *honest[2:]], CTX)
    assert invalid == ["node2"] and [int(m) for m in combined] == plaintexts
    with pytest.raises(NotEnoughPartialsError, match="node2") as many:
        combine_partials(public, ciphertexts, [honest[0], cheat, honest[3]], CTX)
    assert many.value.invalid == ["node2"]
    # another node's partial re-labelled as node2's fails too
    stolen = dataclasses.replace(honest[0], index=2)
    with pytest.raises(InvalidPartialError, match="node2"):
        verify_partial(public, ciphertexts, stolen, CTX)


def test_a_proof_is_bound_to_its_context_and_ciphertexts(safe_primes: list[int]) -> None:
    p, q = safe_primes[:2]
    public, shares = deal(p, q, 2, _members(3))
    ciphertexts = Encryptor(public.paillier, workers=1).encrypt_raw([5, 6, 7])
    partial = partial_decrypt(shares[0], ciphertexts, CTX)
    verify_partial(public, ciphertexts, partial, CTX)
    with pytest.raises(InvalidPartialError):
        verify_partial(public, ciphertexts, partial, CTX + b"x")
    with pytest.raises(InvalidPartialError):
        verify_partial(public, list(reversed(ciphertexts)), partial, CTX)


def test_partial_wire_form_round_trips_and_refuses_garbage(safe_primes: list[int]) -> None:
    p, q = safe_primes[:2]
    public, shares = deal(p, q, 2, _members(3))
    ciphertexts = Encryptor(public.paillier, workers=1).encrypt_raw([1, 2])
    partial = partial_decrypt(shares[1], ciphertexts, CTX)
    data = partial.to_bytes(public)
    assert PartialDecryption.from_bytes(data, public) == partial
    with pytest.raises(WireFormatError, match=r"truncated|expected"):
        PartialDecryption.from_bytes(data[:-1], public)
    with pytest.raises(WireFormatError):
        PartialDecryption.from_bytes(b"XXXX" + data[4:], public)
    other, _ = deal(safe_primes[2], safe_primes[3], 2, _members(3))
    with pytest.raises(KeyMismatchError):
        PartialDecryption.from_bytes(data, other)


def test_lagrange_coefficients_are_integers_that_interpolate() -> None:
    for indices in ([1, 2, 3], [2, 5, 7], [1], [3, 4, 6, 7]):
        lam = lagrange_at_zero(indices, 5040)
        # f(x) = 11 + 3x + x^2: sum lam_i f(i) = Delta * f(0) when deg f < len(indices)
        if len(indices) >= 3:
            assert sum(lam[i] * (11 + 3 * i + i * i) for i in indices) == 5040 * 11


def test_key_files_hold_one_share_each_mode_0600(tmp_path: Path, safe_primes: list[int]) -> None:
    p, q = safe_primes[:2]
    public, shares = deal(p, q, 2, _members(3))
    public_path, share_paths = write_threshold_key(tmp_path, public, shares)
    for path in share_paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_threshold_public_key(public_path, allow_insecure=True) == public
    # an ordinary public-key reader (and so phe) reads it as a plain Paillier key
    assert int(load_public_key(public_path, allow_insecure=True).n) == public.n
    loaded = load_key_share(share_paths[1], node_id="node2", allow_insecure=True)
    assert loaded.secret == shares[1].secret and loaded.index == 2
    with pytest.raises(KeyFileError, match="belongs to 'node2'"):
        load_key_share(share_paths[1], node_id="node3", allow_insecure=True)
    share_paths[1].chmod(0o640)  # a share others may read is refused, not warned about
    with pytest.raises(KeyFileError, match=r"key share file is accessible .*chmod 600"):
        load_key_share(share_paths[1], node_id="node2", allow_insecure=True)
    share_paths[1].chmod(0o600)
    with pytest.raises(KeyFileError, match="secret key material"):
        load_threshold_public_key(share_paths[0], allow_insecure=True)
    with pytest.raises(InsecureKeyError, match="too small"):
        load_threshold_public_key(public_path)
    tampered = json.loads(share_paths[0].read_text())
    tampered["share"] = json.loads(share_paths[1].read_text())["share"]
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(tampered))
    with pytest.raises(KeyFileError, match="verification key"):
        load_key_share(forged, allow_insecure=True)
    with pytest.raises(KeyFileError, match="already exists"):
        write_threshold_key(tmp_path, public, shares)


def test_interop_with_the_damgard_jurik_package(safe_primes: list[int]) -> None:
    """PyPI `damgard-jurik` (Boucher et al. 2019) implements the same scheme (s = 1 here):
    its shares make our partial decryptions bit for bit, and each side decrypts the
    other's ciphertexts."""
    pytest.importorskip("damgard_jurik")
    from damgard_jurik.crypto import EncryptedNumber, PrivateKeyRing, PrivateKeyShare, PublicKey
    from damgard_jurik.shamir import share_secret

    # their key set-up (keygen with our cached safe primes instead of fresh ones)
    p, q = safe_primes[:2]
    n, m = p * q, ((p - 1) // 2) * ((q - 1) // 2)
    delta = math.factorial(5)
    their_public = PublicKey(n=n, s=1, m=m, threshold=3, delta=delta)
    d = m * int(gmpy2.invert(m, n))
    their_shares = [
        PrivateKeyShare(public_key=their_public, i=i, s_i=s_i)
        for i, s_i in share_secret(secret=d, modulus=n * m, threshold=3, n_shares=5)
    ]
    ring = PrivateKeyRing(their_shares[1:4])
    # our public key for their shares (verification keys derive from the shares)
    nsquare = n * n
    v = int(gmpy2.powmod(secrets.randbelow(nsquare - 2) + 2, 2, nsquare))
    public = ThresholdPublicKey(
        n=n,
        threshold=3,
        members=tuple((f"node{int(s.i)}", int(s.i)) for s in their_shares),
        v=v,
        verification=tuple(int(gmpy2.powmod(v, delta * int(s.s_i), nsquare)) for s in their_shares),
    )
    ours = [
        ThresholdKeyShare(public, f"node{int(s.i)}", int(s.i), int(s.s_i)) for s in their_shares
    ]
    plaintexts = [secrets.randbelow(n) for _ in range(4)]
    # their ciphertexts, our partial decryption and combination
    theirs = [int(their_public.encrypt(m).value) for m in plaintexts]
    partials = [partial_decrypt(s, theirs, CTX) for s in ours[2:]]
    for share, partial in zip(their_shares[2:], partials, strict=True):
        assert list(partial.values) == [
            int(share.decrypt(EncryptedNumber(c, their_public))) for c in theirs
        ]
    combined, _ = combine_partials(public, theirs, partials, CTX)
    assert [int(m) for m in combined] == plaintexts
    # our ciphertexts, their decryption
    mine = Encryptor(public.paillier, workers=1).encrypt_raw(plaintexts)
    assert isinstance(ring, PrivateKeyRing)
    assert [int(ring.decrypt(EncryptedNumber(c, their_public))) for c in mine] == plaintexts


def _roster(path: Path, nodes: list[str]) -> Path:
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    lines = []
    for node in [*nodes, "agg"]:
        raw = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        key = base64.b64encode(raw).decode()
        role = "aggregation" if node == "agg" else "analysis"
        lines.append(f'[[member]]\nid = "{node}"\nrole = "{role}"\npublic_key = "ed25519:{key}"\n')
    path.write_text("\n".join(lines))
    return path


def test_cli_deals_a_2048_bit_key_to_the_roster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("flame.identity.roster")
    roster = _roster(tmp_path / "roster.toml", ["clinic-b", "clinic-a", "clinic-c"])
    out = tmp_path / "keys"
    assert (
        keys_cli(["generate", "--threshold", "2", "--roster", str(roster), "--out", str(out)]) == 0
    )
    captured = capsys.readouterr()
    assert "safe prime" in captured.err and "not kept" in captured.out
    assert "T = 2: any 2 of the 3 shares decrypt, once Q = 3 holders" in captured.out
    files = sorted(os.listdir(out))
    assert files == [
        "public_key.json",
        "share-clinic-a.json",
        "share-clinic-b.json",
        "share-clinic-c.json",
    ]
    public = load_threshold_public_key(out / "public_key.json")
    assert public.n.bit_length() == 2048 and public.threshold == 2
    assert [node for node, _ in public.members] == ["clinic-a", "clinic-b", "clinic-c"]
    shares = [load_key_share(out / f"share-{n}.json", node_id=n) for n in ("clinic-a", "clinic-c")]
    ciphertexts = Encryptor(public.paillier, workers=1).encrypt_raw([42, 7])
    partials = [partial_decrypt(s, ciphertexts, CTX) for s in shares]
    assert [int(m) for m in combine_partials(public, ciphertexts, partials, CTX)[0]] == [42, 7]
    assert keys_cli(["info", str(out / "public_key.json")]) == 0
    assert "threshold public (2 of 3; endorsement quorum Q = 3)" in capsys.readouterr().out
    assert (
        keys_cli(["generate", "--threshold", "4", "--roster", str(roster), "--out", str(out)]) == 2
    )
    assert "must be between 1 and the number of analysis nodes" in capsys.readouterr().err
    # --allow-disjoint-quorums is still accepted (a no-op: the endorsement quorum makes any
    # T safe); here the run stops at the out-of-range threshold, not at the option
    old = ["generate", "--threshold", "0", "--allow-disjoint-quorums", "--roster", str(roster)]
    assert keys_cli([*old, "--out", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert "must be between 1" in err and "unrecognized" not in err
    assert not (tmp_path / "h").exists()

"""The batched proof of plaintext knowledge that threshold contributions carry."""

from __future__ import annotations

import gmpy2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from phe.paillier import PaillierPublicKey

from flame.protocols.paillier import Encryptor, SecureSumSpec
from flame.protocols.paillier.keys import generate_keypair, key_id
from flame.protocols.paillier.plaintext_proof import (
    InvalidProofError,
    Opening,
    proof_size,
    prove,
    verify,
)
from flame.secure.contributions import proof_context

SPEC = SecureSumSpec(precision=16, bound=2.0**15, max_nodes=100)


@pytest.fixture(scope="module")
def public() -> PaillierPublicKey:
    """A small key (512 bits) for speed; nothing here depends on the size."""
    return generate_keypair(512, allow_insecure=True)[0]


def _context(
    public: PaillierPublicKey, epoch: int = 0, path: str = "total", node: str = "a"
) -> bytes:
    return proof_context(key_id(public), "run1", epoch, path, node)


def _opened(public: PaillierPublicKey, values: list[float], obfuscation: str = "standard"):  # type: ignore[no-untyped-def]
    enc = Encryptor(public, workers=1, obfuscation=obfuscation)  # type: ignore[arg-type]
    vector, opening = enc.encrypt_opened(values, SPEC)
    return vector.ciphertexts, opening


def _rejects(public: PaillierPublicKey, cts: list, proof: bytes, context: bytes) -> bool:  # type: ignore[type-arg]
    try:
        verify(public.n, cts, proof, context)
    except InvalidProofError:
        return True
    return False


@pytest.mark.parametrize("obfuscation", ["standard", "djn"])
def test_a_valid_proof_verifies(public: PaillierPublicKey, obfuscation: str) -> None:
    cts, opening = _opened(public, [float(i) for i in range(200)], obfuscation)
    assert len(cts) > 1
    proof = prove(public.n, cts, opening, _context(public))
    assert len(proof) == proof_size(public.n)
    verify(public.n, cts, proof, _context(public))


def test_a_proof_is_bound_to_its_vector_field_epoch_node_and_key(public: PaillierPublicKey) -> None:
    cts, opening = _opened(public, [1.0, 2.0, 3.0])
    proof = prove(public.n, cts, opening, _context(public))
    other_cts, _ = _opened(public, [1.0, 2.0, 3.0])
    assert _rejects(public, other_cts, proof, _context(public))
    assert _rejects(public, cts, proof, _context(public, path="other"))
    assert _rejects(public, cts, proof, _context(public, epoch=1))
    assert _rejects(public, cts, proof, _context(public, node="b"))
    other_key = generate_keypair(512, allow_insecure=True)[0]
    assert _rejects(public, cts, proof, proof_context(key_id(other_key), "run1", 0, "total", "a"))
    assert _rejects(public, cts, proof, proof_context(key_id(public), "run2", 0, "total", "a"))


def test_tampering_with_any_part_fails(public: PaillierPublicKey) -> None:
    cts, opening = _opened(public, [float(i) for i in range(60)])
    context = _context(public)
    proof = prove(public.n, cts, opening, context)
    n = gmpy2.mpz(public.n)
    n2bytes = (int(n * n).bit_length() + 7) // 8
    nbytes = (int(n).bit_length() + 7) // 8
    parts = [(0, n2bytes), (n2bytes, nbytes), (n2bytes + nbytes, nbytes)]  # A, z, w
    for start, size in parts:
        value = int.from_bytes(proof[start : start + size], "big")
        for changed in (value + 1, value * 2 % (1 << (8 * size)), 0):
            forged = proof[:start] + changed.to_bytes(size, "big") + proof[start + size :]
            assert _rejects(public, cts, forged, context)
    for j in (0, len(cts) // 2, len(cts) - 1):  # any ciphertext, even by a valid encryption of 0
        changed = list(cts)
        changed[j] = changed[j] * gmpy2.powmod(3, n, n * n) % (n * n)
        assert _rejects(public, changed, proof, context)
        changed[j] = cts[j] * (1 + n) % (n * n)  # plaintext + 1
        assert _rejects(public, changed, proof, context)
    assert _rejects(public, cts[:-1], proof, context)  # a ciphertext dropped
    assert _rejects(public, [*cts, cts[0]], proof, context)  # one added
    assert _rejects(public, cts, proof[:-1], context)
    assert _rejects(public, cts, proof + b"\0", context)


def test_a_proof_replayed_on_a_rerandomised_vector_fails(public: PaillierPublicKey) -> None:
    """The same plaintexts under fresh randomness (what a copier can make) need a new proof,
    which only someone who knows the plaintexts and the old randomness can give."""
    cts, opening = _opened(public, [4.0, 5.0])
    context = _context(public)
    proof = prove(public.n, cts, opening, context)
    n = gmpy2.mpz(public.n)
    rerandomised = [c * gmpy2.powmod(7 + i, n, n * n) % (n * n) for i, c in enumerate(cts)]
    assert _rejects(public, rerandomised, proof, context)
    # with the re-randomisers the owner can prove again: the proof is about knowledge
    rs = tuple(r * (7 + i) % n for i, r in enumerate(opening.randomness))
    reproved = prove(public.n, rerandomised, Opening(opening.plaintexts, rs), context)
    verify(public.n, rerandomised, reproved, context)


def test_a_wrong_opening_gives_no_valid_proof(public: PaillierPublicKey) -> None:
    cts, opening = _opened(public, [4.0, 5.0])
    context = _context(public)
    wrong_m = Opening((opening.plaintexts[0] + 1,), opening.randomness)
    assert _rejects(public, cts, prove(public.n, cts, wrong_m, context), context)
    wrong_r = Opening(opening.plaintexts, (opening.randomness[0] + 1,))
    assert _rejects(public, cts, prove(public.n, cts, wrong_r, context), context)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=st.lists(st.integers(-(2**15) + 1, 2**15 - 1), min_size=1, max_size=80),
    obfuscation=st.sampled_from(["standard", "djn"]),
    flip=st.integers(min_value=0),
)
def test_property_valid_proofs_verify_and_a_changed_ciphertext_fails(
    public: PaillierPublicKey, values: list[int], obfuscation: str, flip: int
) -> None:
    cts, opening = _opened(public, [float(v) for v in values], obfuscation)
    context = _context(public)
    proof = prove(public.n, cts, opening, context)
    verify(public.n, cts, proof, context)
    n = gmpy2.mpz(public.n)
    changed = list(cts)
    j = flip % len(cts)
    changed[j] = changed[j] * (1 + n) % (n * n)
    assert _rejects(public, changed, proof, context)

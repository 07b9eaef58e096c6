"""Batched non-interactive proof that a contributor knows the plaintexts of its ciphertexts.

Why: in threshold mode the share holders decrypt whatever sum they endorse. Without this
proof a contributor colluding with the aggregator could send the inverse of a
re-randomised copy of other nodes' ciphertexts, Enc(-(a + b)) = (c_a * c_b)**-1 * rho**n,
so that the decrypted "sum" is one node's values. It cannot prove knowledge of that
vector's plaintexts, because it does not know a's and b's.

The proof (Schnorr-style, g = 1 + n of order n modulo n**2, Fiat-Shamir): for
c_j = g**m_j * r_j**n the prover picks x in [0, n) and s in Z_n*, sends A = g**x * s**n,
derives 128-bit coefficients e_j from (context, n, the ciphertexts, A, k) and answers
z = x + sum e_j m_j mod n, w = s * prod r_j**e_j mod n. The verifier checks
g**z * w**n == A * prod c_j**e_j (mod n**2): one full exponentiation plus one multi-
exponentiation with 128-bit exponents (`_multi_pow`). The context binds the proof to a
key, run, epoch, field and node, so a proof cannot be replayed under another.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import gmpy2

from flame.protocols.paillier._math import Mpz
from flame.protocols.paillier.errors import SecureAggregationError

__all__ = [
    "COEFFICIENT_BITS",
    "InvalidProofError",
    "Opening",
    "proof_size",
    "prove",
    "verify",
]

_DOMAIN = b"flame-paillier-plaintext-knowledge-v1\0"
COEFFICIENT_BITS = 128
"""Each e_j; a cheating prover passes with probability about 2**-128."""


class InvalidProofError(SecureAggregationError):
    """A proof of plaintext knowledge is malformed or does not verify."""


@dataclass(frozen=True, repr=False)
class Opening:
    """What only the encrypting node knows: the plaintext integers and the randomness.

    ``randomness`` holds r_j (c_j = g**m_j * r_j**n), or with DJN obfuscation the short
    exponents a_j of h_s**a_j = (h**a_j)**n, with ``base`` = h mod n; then
    prod r_j**e_j = h**(sum e_j a_j) costs one exponentiation.
    """

    plaintexts: tuple[int, ...]
    randomness: tuple[Mpz, ...]
    base: Mpz | None = None

    def __repr__(self) -> str:  # secret: never in a log or a traceback
        return f"<Opening of {len(self.plaintexts)} ciphertexts>"


def _width(n: Mpz) -> tuple[int, int]:
    nbytes = (int(n).bit_length() + 7) // 8
    return nbytes, (int(n * n).bit_length() + 7) // 8


def proof_size(n: int) -> int:
    """Bytes of a proof under modulus n: A (mod n**2), z and w (mod n)."""
    nbytes, n2bytes = _width(gmpy2.mpz(n))
    return n2bytes + 2 * nbytes


def _coefficients(n: Mpz, context: bytes, ciphertexts: Sequence[Mpz], commitment: Mpz) -> list[int]:
    """The e_j: SHAKE-256 over (domain, n, context, k, SHA-256 of the ciphertexts, A)."""
    nbytes, n2bytes = _width(n)
    vector = hashlib.sha256()
    for c in ciphertexts:
        vector.update(int(c).to_bytes(n2bytes, "big"))
    h = hashlib.sha256(_DOMAIN)
    h.update(struct.pack(">QQ", len(context), len(ciphertexts)))
    h.update(context)
    h.update(int(n).to_bytes(nbytes, "big"))
    h.update(vector.digest())
    h.update(int(commitment).to_bytes(n2bytes, "big"))
    size = COEFFICIENT_BITS // 8
    stream = hashlib.shake_256(h.digest() + b"coefficients").digest(size * len(ciphertexts))
    return [int.from_bytes(stream[i : i + size], "big") for i in range(0, len(stream), size)]


_BUCKETS_FROM = 32
"""From this many bases on, `_multi_pow`'s buckets beat one powmod per base (measured:
its fixed cost of ~8,000 multiplications is ~20 ms at 2048 bits; one powmod ~0.7 ms)."""


def _multi_pow(bases: Sequence[Mpz], exponents: Sequence[int], modulus: Mpz) -> Mpz:
    """prod b**e mod m for 128-bit e."""
    if len(bases) < _BUCKETS_FROM:
        acc = gmpy2.mpz(1)
        for b, e in zip(bases, exponents, strict=True):
            acc = acc * gmpy2.powmod(b, e, modulus) % modulus
        return acc
    from flame.protocols.paillier.threshold_partial import _multi_pow

    return _multi_pow(bases, exponents, modulus)


def prove(n: int | Mpz, ciphertexts: Sequence[Mpz], opening: Opening, context: bytes) -> bytes:
    """The proof, as bytes, that the prover knows the opening of `ciphertexts`."""
    n = gmpy2.mpz(n)
    nsquare = n * n
    if len(opening.plaintexts) != len(ciphertexts) or len(opening.randomness) != len(ciphertexts):
        raise SecureAggregationError("the opening does not match the ciphertexts")
    x = gmpy2.mpz(secrets.randbelow(int(n)))
    while True:
        s = gmpy2.mpz(1 + secrets.randbelow(int(n) - 1))
        if gmpy2.gcd(s, n) == 1:
            break
    commitment = (1 + x * n) * gmpy2.powmod(s, n, nsquare) % nsquare
    e = _coefficients(n, context, ciphertexts, commitment)
    z = (x + sum(ej * m for ej, m in zip(e, opening.plaintexts, strict=True))) % n
    if opening.base is None:
        product = _multi_pow([gmpy2.mpz(r) % n for r in opening.randomness], e, n)
    else:
        exponent = sum(ej * int(a) for ej, a in zip(e, opening.randomness, strict=True))
        product = gmpy2.powmod(gmpy2.mpz(opening.base), exponent, n)
    w = s * product % n
    nbytes, n2bytes = _width(n)
    return (
        int(commitment).to_bytes(n2bytes, "big")
        + int(z).to_bytes(nbytes, "big")
        + int(w).to_bytes(nbytes, "big")
    )


def verify(n: int | Mpz, ciphertexts: Sequence[Mpz], proof: bytes, context: bytes) -> None:
    """Return if `proof` shows knowledge of the plaintexts of `ciphertexts` under `context`,
    else raise InvalidProofError. The ciphertexts must already be range-checked."""
    n = gmpy2.mpz(n)
    nsquare = n * n
    nbytes, n2bytes = _width(n)
    if len(proof) != n2bytes + 2 * nbytes:
        raise InvalidProofError(f"the proof has {len(proof)} bytes, not {n2bytes + 2 * nbytes}")
    if not ciphertexts:
        raise InvalidProofError("a proof over no ciphertexts")
    commitment = gmpy2.mpz(int.from_bytes(proof[:n2bytes], "big"))
    z = gmpy2.mpz(int.from_bytes(proof[n2bytes : n2bytes + nbytes], "big"))
    w = gmpy2.mpz(int.from_bytes(proof[n2bytes + nbytes :], "big"))
    if not (0 < commitment < nsquare and math.gcd(int(commitment), int(n)) == 1):
        raise InvalidProofError("the proof's commitment is not a unit modulo n**2")
    if not (0 <= z < n and 0 < w < n and gmpy2.gcd(w, n) == 1):
        raise InvalidProofError("the proof's response is out of range")
    e = _coefficients(n, context, ciphertexts, commitment)
    left = (1 + z * n) * gmpy2.powmod(w, n, nsquare) % nsquare
    right = commitment * _multi_pow([gmpy2.mpz(c) for c in ciphertexts], e, nsquare) % nsquare
    if left != right:
        raise InvalidProofError("the proof of plaintext knowledge does not verify")

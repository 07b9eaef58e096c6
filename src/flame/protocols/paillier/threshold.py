"""Threshold Paillier (Damgard-Jurik with s = 1, after Shoup's threshold RSA).

Why this scheme: it keeps ordinary Paillier ciphertexts (so encoding, packing, the wire
form and phe interoperation stay as they are), decryption needs no interaction between
share holders (each sends one partial decryption), any T of the n shares decrypt, and each
partial decryption comes with a non-interactive proof that the holder used its share. The
price is a trusted dealer (`deal`) who sees the factorisation once and forgets it.

Key: n = pq with safe primes p = 2p' + 1, q = 2q' + 1; m = p'q'. The secret d satisfies
d = 0 mod m and d = 1 mod n; f is a random polynomial of degree T - 1 over Z_{nm} with
f(0) = d, and holder i gets s_i = f(i). Delta = l! for l shares. Public: n, a random square
v of Z*_{n^2} and verification keys v_i = v^(Delta * s_i).

Partial decryption of c by holder i: c_i = c^(2 * Delta * s_i) mod n^2. Combining T of them
with the integer Lagrange coefficients lambda_i = Delta * prod_{j != i} j / (j - i) gives
prod c_i^(2 lambda_i) = c^(4 Delta^2 d) = 1 + 4 Delta^2 M n mod n^2, hence M.

Proof (Chaum-Pedersen style, Fiat-Shamir with SHA-256): a holder proves for a whole vector
at once that log_{C^4}(C_i^2) = log_v(v_i), where C = prod c_j^(rho_j) and
C_i = prod c_{i,j}^(rho_j) with 128-bit rho_j derived from a hash of the key, the context,
every ciphertext and every partial (a small-exponent batch test). A single wrong partial
value makes the check fail except with probability about 2**-128. Squaring (C^4, C_i^2)
removes elements of order 2, which a holder could otherwise flip undetectably; they do no
harm because combining also squares.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction

import gmpy2

from flame.protocols.paillier._math import Mpz
from flame.protocols.paillier.errors import SecureAggregationError
from flame.protocols.paillier.threshold_keys import (
    ThresholdKeyShare,
    ThresholdPublicKey,
    deal,
    generate_threshold_key,
)
from flame.protocols.paillier.threshold_partial import (
    InvalidPartialError,
    PartialDecryption,
    partial_decrypt,
    verify_partial,
)

__all__ = [
    "InvalidPartialError",
    "NotEnoughPartialsError",
    "PartialDecryption",
    "ThresholdKeyShare",
    "ThresholdPublicKey",
    "combine_partials",
    "deal",
    "generate_threshold_key",
    "lagrange_at_zero",
    "partial_decrypt",
    "verify_partial",
]


class NotEnoughPartialsError(SecureAggregationError):
    """Fewer than T valid partial decryptions; `invalid` names the holders that cheated."""

    def __init__(self, message: str, *, invalid: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.invalid = list(invalid)


# --------------------------------------------------------------------------- combining


def lagrange_at_zero(indices: Sequence[int], delta: int) -> dict[int, int]:
    """Delta * prod_{j != i} j / (j - i): integers because Delta = l!."""
    out: dict[int, int] = {}
    for i in indices:
        value = Fraction(delta)
        for j in indices:
            if j != i:
                value *= Fraction(j, j - i)
        if value.denominator != 1:  # pragma: no cover - Delta = l! guarantees this
            raise SecureAggregationError("Lagrange coefficient is not an integer")
        out[i] = int(value)
    return out


def combine_partials(
    public: ThresholdPublicKey,
    ciphertexts: Sequence[int | Mpz],
    partials: Iterable[PartialDecryption],
    context: bytes,
    *,
    verify: bool = True,
) -> tuple[list[Mpz], list[str]]:
    """Plaintexts from any T valid partial decryptions, and the names of holders whose
    partials failed their proofs. Raises NotEnoughPartialsError with fewer than T."""
    valid: dict[int, PartialDecryption] = {}
    invalid: list[str] = []
    for partial in partials:
        if partial.index in valid:
            continue
        if verify:
            try:
                verify_partial(public, ciphertexts, partial, context)
            except InvalidPartialError as exc:
                invalid.append(exc.node_id)
                continue
        valid[partial.index] = partial
        if len(valid) == public.threshold:
            break
    if len(valid) < public.threshold:
        named = f"; wrong partial decryptions from {', '.join(invalid)}" if invalid else ""
        raise NotEnoughPartialsError(
            f"{len(valid)} valid partial decryption(s), {public.threshold} needed{named}",
            invalid=invalid,
        )
    return _combine(public, [gmpy2.mpz(int(c)) for c in ciphertexts], valid), invalid


def _combine(
    public: ThresholdPublicKey, ciphertexts: Sequence[Mpz], valid: Mapping[int, PartialDecryption]
) -> list[Mpz]:
    n = gmpy2.mpz(public.n)
    nsquare = n * n
    delta = public.delta
    lambdas = lagrange_at_zero(sorted(valid), delta)
    inverse = gmpy2.invert(4 * gmpy2.mpz(delta) ** 2, n)
    columns = [(valid[i].values, 2 * lam) for i, lam in lambdas.items()]
    out: list[Mpz] = []
    for k in range(len(ciphertexts)):
        acc = gmpy2.mpz(1)
        for values, exponent in columns:
            acc = acc * gmpy2.powmod(gmpy2.mpz(values[k]), exponent, nsquare) % nsquare
        out.append((acc - 1) // n * inverse % n)
    return out

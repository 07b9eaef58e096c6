"""Safe primes p = 2p' + 1 (p' prime) for threshold Paillier keys.

Why safe primes: the threshold scheme (Shoup; Damgard-Jurik) shares a secret exponent modulo
n * p'q' and proves partial decryptions correct in the subgroup of squares, whose order
n * p'q' has only large prime factors. They also meet the DJN short-exponent conditions
(p = q = 3 mod 4 and gcd(p - 1, q - 1) = 2), see README.

Search: a random odd p' of bits - 1 bits, then a window of p' + 2k is sieved so that neither
p' nor 2p' + 1 has a prime factor below 2**15; survivors get a base-2 Fermat test on p and
then Baillie-PSW + Miller-Rabin on both. A 1024-bit safe prime takes seconds to a minute.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable

import gmpy2
import numpy as np

from flame.protocols.paillier._math import PRIME_ROUNDS, Mpz

__all__ = ["ProgressFn", "generate_safe_prime", "is_safe_prime"]

ProgressFn = Callable[[str], None]
"""Receives one short line of progress text (no secrets)."""

_SIEVE_LIMIT = 1 << 15
_WINDOW = 1 << 14


def _sieve_primes() -> list[int]:
    limit = _SIEVE_LIMIT
    flags = np.ones(limit, dtype=bool)
    flags[:2] = False
    for i in range(2, math.isqrt(limit) + 1):
        if flags[i]:
            flags[i * i :: i] = False
    return [int(x) for x in np.flatnonzero(flags) if x > 2]


_PRIMES: list[int] = []


def is_safe_prime(p: int | Mpz) -> bool:
    """Whether p and (p - 1) / 2 are both (probable) primes."""
    p = gmpy2.mpz(p)
    return bool(
        p > 5
        and p % 2 == 1
        and gmpy2.is_prime(p, PRIME_ROUNDS)
        and gmpy2.is_prime((p - 1) // 2, PRIME_ROUNDS)
    )


def generate_safe_prime(bits: int, progress: ProgressFn | None = None) -> Mpz:
    """A safe prime of exactly `bits` bits with p >= 3 * 2**(bits - 2) (so a product of two
    has exactly 2 * bits bits)."""
    if bits < 32:
        raise ValueError("safe primes need at least 32 bits")
    if not _PRIMES:
        _PRIMES.extend(_sieve_primes())
    low = 3 * (gmpy2.mpz(1) << (bits - 3))  # p' range: p = 2p' + 1 in [3 * 2**(bits-2), 2**bits)
    high = (gmpy2.mpz(1) << (bits - 1)) - 1
    span = int(high - low) - 2 * _WINDOW
    if span <= 0:
        raise ValueError("safe primes need at least 32 bits")
    tested = 0
    windows = 0
    while True:
        start = low + secrets.randbelow(span)
        start |= 1
        alive = np.ones(_WINDOW, dtype=bool)
        for r in _PRIMES:
            if r >= start:
                break
            s = int(start % r)
            half = (r + 1) // 2  # the inverse of 2 modulo r
            alive[(-s * half) % r :: r] = False  # r divides p' = start + 2k
            alive[((-half - s) * half) % r :: r] = False  # r divides 2p' + 1
        windows += 1
        for k in np.flatnonzero(alive):
            q = start + 2 * int(k)
            p = 2 * q + 1
            tested += 1
            if gmpy2.powmod(2, p - 1, p) != 1:
                continue
            if gmpy2.is_prime(q, PRIME_ROUNDS) and gmpy2.is_prime(p, PRIME_ROUNDS):
                if progress is not None:
                    progress(f"found a {bits}-bit safe prime after {tested} candidates")
                return p
        if progress is not None and windows % 8 == 0:
            progress(f"searching a {bits}-bit safe prime: {tested} candidates tested")

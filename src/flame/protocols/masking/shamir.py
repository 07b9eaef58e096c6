"""Shamir secret sharing (t of n) over the prime field GF(2**521 - 1), for 32-byte secrets.

A share is (x, y) with x the holder's 1-based index. Any t shares give the secret; fewer say
nothing about it. `combine` uses t shares and checks every further share against the same
polynomial, so one wrong share makes it refuse instead of returning a wrong secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from functools import lru_cache

from flame.protocols.masking.errors import MaskingError

__all__ = [
    "PRIME",
    "SECRET_BYTES",
    "combine",
    "combine_bytes",
    "off_polynomial",
    "split",
    "split_bytes",
]

PRIME = (1 << 521) - 1
"""A Mersenne prime: larger than every 32-byte secret."""
SECRET_BYTES = 32


def _check_threshold(threshold: int, count: int) -> None:
    if not 1 <= threshold <= count:
        raise MaskingError(f"Shamir threshold {threshold} for {count} holders is impossible")


def split(secret: int, threshold: int, xs: Iterable[int]) -> dict[int, int]:
    """Shares of `secret` for the holders with indices `xs` (distinct, in 1..PRIME-1)."""
    points = list(xs)
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise MaskingError("Shamir holder indices must be distinct and positive")
    _check_threshold(threshold, len(points))
    if not 0 <= secret < PRIME:
        raise MaskingError("Shamir secret out of the field")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares: dict[int, int] = {}
    for x in points:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


@lru_cache(maxsize=4096)
def _weights(xs: tuple[int, ...], at: int) -> tuple[int, ...]:
    """Lagrange weights of the points `xs` at `at`: the same holders rebuild many secrets
    (every survivor's seed), so each set of weights is worked out once."""
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(weights)


def _interpolate(points: list[tuple[int, int]], at: int) -> int:
    """The value at `at` of the polynomial through `points` (Lagrange)."""
    weights = _weights(tuple(x for x, _ in points), at)
    return sum(w * y for w, (_, y) in zip(weights, points, strict=True)) % PRIME


def combine(shares: Mapping[int, int], threshold: int) -> int:
    """The secret from at least `threshold` shares; MaskingError if they disagree."""
    if len(shares) < threshold:
        raise MaskingError(f"{len(shares)} shares, {threshold} are needed")
    _check_threshold(threshold, len(shares))
    points = sorted((int(x), int(y)) for x, y in shares.items())
    if any(not 0 < x < PRIME or not 0 <= y < PRIME for x, y in points):
        raise MaskingError("a Shamir share lies outside the field")
    base = points[:threshold]
    for x, y in points[threshold:]:
        if _interpolate(base, x) != y:
            raise MaskingError("the shares do not lie on one polynomial: a share was altered")
    return _interpolate(base, 0)


def off_polynomial(base: Mapping[int, int], shares: Mapping[int, int], threshold: int) -> set[int]:
    """The x of every share in `shares` off the polynomial through `threshold` of the `base`
    shares (a share a revealer altered, once `base` is known good)."""
    points = sorted(base.items())[:threshold]
    return {x for x, y in shares.items() if _interpolate(points, x) != y}


def split_bytes(secret: bytes, threshold: int, xs: Iterable[int]) -> dict[int, int]:
    if len(secret) != SECRET_BYTES:
        raise MaskingError(f"a shared secret has {SECRET_BYTES} bytes")
    return split(int.from_bytes(secret, "big"), threshold, xs)


def combine_bytes(shares: Mapping[int, int], threshold: int) -> bytes:
    value = combine(shares, threshold)
    if value >= 1 << (8 * SECRET_BYTES):
        raise MaskingError("the shares do not combine to a 32-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")

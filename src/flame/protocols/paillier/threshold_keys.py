"""Threshold Paillier keys: the public key, one holder's share, and the trusted dealer.

The scheme is described in `flame.protocols.paillier.threshold`. The dealer (`deal`,
`generate_threshold_key`) sees the factorisation once and forgets it; every share checks
itself against its public verification key when it is built.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import gmpy2
from phe.paillier import PaillierPublicKey

from flame.protocols.paillier._math import Mpz
from flame.protocols.paillier.errors import SecureAggregationError
from flame.protocols.paillier.keys import key_id
from flame.protocols.paillier.safe_primes import ProgressFn, generate_safe_prime, is_safe_prime

__all__ = ["ThresholdKeyShare", "ThresholdPublicKey", "deal", "generate_threshold_key"]

_MAX_PARTIES = 1024


@dataclass(frozen=True)
class ThresholdPublicKey:
    """Everything public about a threshold key: n, T, who holds which share, and the
    verification keys that let anyone check a partial decryption."""

    n: int
    threshold: int
    members: tuple[tuple[str, int], ...]
    """(node id, share index) for every share holder, indices 1..l."""
    v: int
    verification: tuple[int, ...]
    """v_i for share index i = 1..l (position i - 1)."""
    nsquare: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parties = len(self.members)
        if not 1 <= self.threshold <= parties <= _MAX_PARTIES:
            raise SecureAggregationError(
                f"threshold key: need 1 <= T ({self.threshold}) <= shares ({parties}) "
                f"<= {_MAX_PARTIES}"
            )
        if sorted(i for _, i in self.members) != list(range(1, parties + 1)):
            raise SecureAggregationError("threshold key: share indices must be 1..l")
        if len({node for node, _ in self.members}) != parties:
            raise SecureAggregationError("threshold key: a node holds more than one share")
        if len(self.verification) != parties:
            raise SecureAggregationError("threshold key: one verification key per share needed")
        object.__setattr__(self, "nsquare", self.n * self.n)

    @property
    def parties(self) -> int:
        """l: how many shares exist."""
        return len(self.members)

    @property
    def delta(self) -> int:
        """l!: clears the denominators of every Lagrange coefficient."""
        return math.factorial(self.parties)

    @property
    def paillier(self) -> PaillierPublicKey:
        """The ordinary Paillier public key (g = n + 1): what nodes encrypt with."""
        return PaillierPublicKey(self.n)

    @property
    def key_id(self) -> str:
        return key_id(self.paillier)

    def index_of(self, node_id: str) -> int | None:
        return next((i for node, i in self.members if node == node_id), None)

    def node_of(self, index: int) -> str:
        return next((node for node, i in self.members if i == index), f"share {index}")


@dataclass(frozen=True)
class ThresholdKeyShare:
    """One holder's secret share s_i; its file is mode 0600 and never leaves the node."""

    public: ThresholdPublicKey
    node_id: str
    index: int
    secret: int = field(repr=False)

    def __post_init__(self) -> None:
        if self.public.index_of(self.node_id) != self.index:
            raise SecureAggregationError(
                f"key share: node {self.node_id!r} does not hold share {self.index}"
            )
        v_i = gmpy2.powmod(self.public.v, self.public.delta * self.secret, self.public.nsquare)
        if v_i != self.public.verification[self.index - 1]:
            raise SecureAggregationError(
                f"key share of {self.node_id!r} does not match its verification key"
            )


# --------------------------------------------------------------------------- dealing


def deal(
    p: int,
    q: int,
    threshold: int,
    members: Sequence[str],
) -> tuple[ThresholdPublicKey, list[ThresholdKeyShare]]:
    """Split the key n = pq (safe primes) into len(members) shares, any `threshold` of
    which decrypt. members[k] gets share index k + 1. The caller must drop p and q."""
    if not (is_safe_prime(p) and is_safe_prime(q)) or p == q:
        raise SecureAggregationError("threshold keys need two distinct safe primes")
    parties = len(members)
    if not 1 <= threshold <= parties <= _MAX_PARTIES:
        raise SecureAggregationError(
            f"need 1 <= threshold ({threshold}) <= number of share holders ({parties})"
        )
    n = gmpy2.mpz(p) * q
    m = ((gmpy2.mpz(p) - 1) // 2) * ((gmpy2.mpz(q) - 1) // 2)
    nm = n * m
    if gmpy2.gcd(n, m) != 1:
        raise SecureAggregationError("threshold keys need gcd(n, p'q') = 1")
    d = m * gmpy2.invert(m, n)  # d = 0 mod m, d = 1 mod n
    coefficients = [d] + [gmpy2.mpz(secrets.randbelow(int(nm))) for _ in range(threshold - 1)]
    delta = math.factorial(parties)
    nsquare = n * n
    while True:
        r = gmpy2.mpz(2 + secrets.randbelow(int(nsquare) - 3))
        if gmpy2.gcd(r, n) == 1:
            break
    v = r * r % nsquare
    secrets_: list[Mpz] = []
    for i in range(1, parties + 1):
        acc = gmpy2.mpz(0)
        for a in reversed(coefficients):
            acc = (acc * i + a) % nm
        secrets_.append(acc)
    verification = tuple(int(gmpy2.powmod(v, delta * s, nsquare)) for s in secrets_)
    public = ThresholdPublicKey(
        n=int(n),
        threshold=threshold,
        members=tuple((node, k + 1) for k, node in enumerate(members)),
        v=int(v),
        verification=verification,
    )
    shares = [
        ThresholdKeyShare(public, node, k + 1, int(s))
        for k, (node, s) in enumerate(zip(members, secrets_, strict=True))
    ]
    return public, shares


def generate_threshold_key(
    bits: int,
    threshold: int,
    members: Sequence[str],
    progress: ProgressFn | None = None,
) -> tuple[ThresholdPublicKey, list[ThresholdKeyShare]]:
    """New safe primes, dealt at once; the primes exist only inside this call."""
    if bits % 2 or bits < 64:
        raise SecureAggregationError("key size must be an even number of bits, at least 64")
    while True:
        p = generate_safe_prime(bits // 2, progress)
        q = generate_safe_prime(bits // 2, progress)
        if p != q and (p * q).bit_length() == bits:
            break
    public, shares = deal(int(p), int(q), threshold, members)
    del p, q
    if progress is not None:
        progress(f"dealt {len(shares)} shares, any {threshold} decrypt; primes discarded")
    return public, shares

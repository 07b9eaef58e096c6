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

import hashlib
import math
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import gmpy2
from phe.paillier import PaillierPublicKey

from flame.protocols.paillier._math import Mpz, powmod_base_list
from flame.protocols.paillier.errors import (
    KeyMismatchError,
    SecureAggregationError,
    WireFormatError,
)
from flame.protocols.paillier.keys import key_id
from flame.protocols.paillier.pool import available_cores
from flame.protocols.paillier.safe_primes import ProgressFn, generate_safe_prime, is_safe_prime

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

_DOMAIN = b"flame-threshold-paillier-v1\0"
_RHO_BITS = 128
_CHALLENGE_BITS = 256
_STAT_BITS = 128
_MAX_PARTIES = 1024


class InvalidPartialError(SecureAggregationError):
    """A partial decryption failed its proof; `node_id` names the share holder."""

    def __init__(self, message: str, *, node_id: str, index: int) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.index = index


class NotEnoughPartialsError(SecureAggregationError):
    """Fewer than T valid partial decryptions; `invalid` names the holders that cheated."""

    def __init__(self, message: str, *, invalid: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.invalid = list(invalid)


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


# --------------------------------------------------------------------------- proofs


def _width(public: ThresholdPublicKey) -> int:
    return (public.nsquare.bit_length() + 7) // 8


def _transcript(
    public: ThresholdPublicKey,
    index: int,
    context: bytes,
    ciphertexts: Sequence[Mpz],
    values: Sequence[Mpz],
) -> bytes:
    """SHA-256 over everything the proof is about; seeds the batch coefficients."""
    width = _width(public)
    h = hashlib.sha256(_DOMAIN)
    h.update(struct.pack(">IIQ", index, len(ciphertexts), len(context)))
    h.update(context)
    h.update(public.n.to_bytes(width, "big"))
    h.update(public.v.to_bytes(width, "big"))
    h.update(public.verification[index - 1].to_bytes(width, "big"))
    for c in ciphertexts:
        h.update(int(c).to_bytes(width, "big"))
    for x in values:
        h.update(int(x).to_bytes(width, "big"))
    return h.digest()


def _batch_coefficients(seed: bytes, count: int) -> list[int]:
    out: list[int] = []
    counter = 0
    while len(out) < count:
        block = hashlib.sha256(seed + b"rho" + counter.to_bytes(8, "big")).digest()
        out.append(int.from_bytes(block[:16], "big"))
        out.append(int.from_bytes(block[16:], "big"))
        counter += 1
    return out[:count]


def _multi_pow(bases: Sequence[Mpz], exponents: Sequence[int], modulus: Mpz) -> Mpz:
    """prod b**e mod m for 128-bit exponents, by buckets (Pippenger): about
    16 * (len + 510) multiplications instead of len full exponentiations."""
    window = 8
    digits = [e.to_bytes(_RHO_BITS // 8, "big") for e in exponents]
    acc = gmpy2.mpz(1)
    for w in range(_RHO_BITS // window):
        if w:
            for _ in range(window):
                acc = acc * acc % modulus
        buckets: list[Mpz | None] = [None] * 256
        for b, d in zip(bases, digits, strict=True):
            digit = d[w]
            if digit:
                current = buckets[digit]
                buckets[digit] = b if current is None else current * b % modulus
        running = gmpy2.mpz(1)
        total = gmpy2.mpz(1)
        for digit in range(255, 0, -1):
            bucket = buckets[digit]
            if bucket is not None:
                running = running * bucket % modulus
            total = total * running % modulus
        acc = acc * total % modulus
    return acc


def _challenge(seed: bytes, bases: Iterable[Mpz], width: int) -> int:
    h = hashlib.sha256(seed + b"challenge")
    for x in bases:
        h.update(int(x).to_bytes(width, "big"))
    return int.from_bytes(h.digest(), "big") >> (256 - _CHALLENGE_BITS)


@dataclass(frozen=True)
class PartialDecryption:
    """Holder `index`'s partial decryptions of a vector of ciphertexts, with the proof
    (challenge e, response z) that they were made with its share."""

    key_id: str
    index: int
    values: tuple[int, ...]
    challenge: int
    response: int

    _HEADER = struct.Struct(">4sB8sHIHI")
    _MAGIC = b"FLPD"

    def to_bytes(self, public: ThresholdPublicKey) -> bytes:
        width = _width(public)
        z = self.response.to_bytes((self.response.bit_length() + 7) // 8 or 1, "big")
        header = self._HEADER.pack(
            self._MAGIC, 1, bytes.fromhex(self.key_id), self.index, len(self.values), width, len(z)
        )
        return b"".join(
            [header, self.challenge.to_bytes(_CHALLENGE_BITS // 8, "big"), z]
            + [x.to_bytes(width, "big") for x in self.values]
        )

    @classmethod
    def from_bytes(cls, data: bytes, public: ThresholdPublicKey) -> PartialDecryption:
        """Parse and range-check; the proof is checked separately (verify_partial)."""
        data = bytes(data)
        size = cls._HEADER.size
        if len(data) < size:
            raise WireFormatError("partial decryption truncated")
        magic, version, kid, index, count, width, zlen = cls._HEADER.unpack_from(data)
        if magic != cls._MAGIC or version != 1:
            raise WireFormatError("not a flame partial decryption")
        if kid.hex() != public.key_id:
            raise KeyMismatchError(f"partial decryption is for key {kid.hex()}")
        if not 1 <= index <= public.parties:
            raise WireFormatError(f"partial decryption names unknown share {index}")
        if width != _width(public) or zlen > 2 * width + 256:
            raise WireFormatError("partial decryption has the wrong width")
        expected = size + _CHALLENGE_BITS // 8 + zlen + count * width
        if len(data) != expected:
            raise WireFormatError(f"partial decryption is {len(data)} bytes, expected {expected}")
        pos = size
        challenge = int.from_bytes(data[pos : pos + _CHALLENGE_BITS // 8], "big")
        pos += _CHALLENGE_BITS // 8
        response = int.from_bytes(data[pos : pos + zlen], "big")
        pos += zlen
        values = tuple(
            int.from_bytes(data[pos + k * width : pos + (k + 1) * width], "big")
            for k in range(count)
        )
        nsquare = public.nsquare
        for x in values:
            if not 0 < x < nsquare:
                raise WireFormatError("a partial decryption value is out of range")
        return cls(kid.hex(), index, values, challenge, response)


def partial_decrypt(
    share: ThresholdKeyShare,
    ciphertexts: Sequence[int | Mpz],
    context: bytes,
    *,
    workers: int | None = None,
) -> PartialDecryption:
    """c^(2 Delta s_i) for every ciphertext, and one proof for all of them.

    `context` (analysis, epoch, field, contributor set) is bound into the proof, so a
    partial decryption cannot be passed off as an answer to another request.
    """
    public = share.public
    nsquare = gmpy2.mpz(public.nsquare)
    exponent = 2 * public.delta * gmpy2.mpz(share.secret)
    cs = [gmpy2.mpz(int(c)) for c in ciphertexts]
    threads = available_cores() if workers is None else max(1, workers)
    values = powmod_base_list(cs, exponent, nsquare, threads)  # GIL-free threads
    challenge, response = _prove(share, cs, values, context)
    return PartialDecryption(
        public.key_id, share.index, tuple(int(x) for x in values), challenge, response
    )


def _bases(
    public: ThresholdPublicKey,
    index: int,
    context: bytes,
    ciphertexts: Sequence[Mpz],
    values: Sequence[Mpz],
) -> tuple[bytes, Mpz, Mpz]:
    seed = _transcript(public, index, context, ciphertexts, values)
    rho = _batch_coefficients(seed, len(ciphertexts))
    nsquare = gmpy2.mpz(public.nsquare)
    big_c = _multi_pow(ciphertexts, rho, nsquare)
    big_ci = _multi_pow(values, rho, nsquare)
    return seed, gmpy2.powmod(big_c, 4, nsquare), gmpy2.powmod(big_ci, 2, nsquare)


def _prove(
    share: ThresholdKeyShare, ciphertexts: Sequence[Mpz], values: Sequence[Mpz], context: bytes
) -> tuple[int, int]:
    public = share.public
    nsquare = gmpy2.mpz(public.nsquare)
    seed, c4, ci2 = _bases(public, share.index, context, ciphertexts, values)
    x = public.delta * gmpy2.mpz(share.secret)
    r_bits = int(x.bit_length()) + _CHALLENGE_BITS + _STAT_BITS
    r = gmpy2.mpz(secrets.randbits(r_bits))
    a = gmpy2.powmod(c4, r, nsquare)
    b = gmpy2.powmod(public.v, r, nsquare)
    v_i = public.verification[share.index - 1]
    e = _challenge(seed, (c4, ci2, public.v, v_i, a, b), _width(public))
    return e, int(r + e * x)


def verify_partial(
    public: ThresholdPublicKey,
    ciphertexts: Sequence[int | Mpz],
    partial: PartialDecryption,
    context: bytes,
) -> None:
    """Raise InvalidPartialError (naming the holder) unless the proof checks out."""
    node = public.node_of(partial.index)
    if partial.key_id != public.key_id or not 1 <= partial.index <= public.parties:
        raise InvalidPartialError(
            f"partial decryption from {node!r} is for another key", node_id=node, index=0
        )
    if len(partial.values) != len(ciphertexts):
        raise InvalidPartialError(
            f"partial decryption from {node!r} has {len(partial.values)} values for "
            f"{len(ciphertexts)} ciphertexts",
            node_id=node,
            index=partial.index,
        )
    nsquare = gmpy2.mpz(public.nsquare)
    n = gmpy2.mpz(public.n)
    values = [gmpy2.mpz(x) for x in partial.values]
    product = gmpy2.mpz(1)
    for x in values:
        if not 0 < x < nsquare:
            raise InvalidPartialError(
                f"partial decryption from {node!r} is out of range",
                node_id=node,
                index=partial.index,
            )
        product = product * x % n
    if gmpy2.gcd(product, n) != 1:
        raise InvalidPartialError(
            f"partial decryption from {node!r} is not invertible", node_id=node, index=partial.index
        )
    cs = [gmpy2.mpz(int(c)) for c in ciphertexts]
    seed, c4, ci2 = _bases(public, partial.index, context, cs, values)
    e, z = gmpy2.mpz(partial.challenge), gmpy2.mpz(partial.response)
    v_i = gmpy2.mpz(public.verification[partial.index - 1])
    ok = z >= 0 and gmpy2.gcd(ci2, n) == 1 and gmpy2.gcd(v_i, n) == 1
    if ok:
        a = gmpy2.powmod(c4, z, nsquare) * gmpy2.powmod(ci2, -e, nsquare) % nsquare
        b = gmpy2.powmod(public.v, z, nsquare) * gmpy2.powmod(v_i, -e, nsquare) % nsquare
        ok = _challenge(seed, (c4, ci2, public.v, v_i, a, b), _width(public)) == e
    if not ok:
        raise InvalidPartialError(
            f"partial decryption from {node!r} (share {partial.index}) fails its proof of "
            "correctness; that node sent a wrong decryption",
            node_id=node,
            index=partial.index,
        )


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

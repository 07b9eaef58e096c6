"""Threshold Paillier partial decryptions: what one share holder sends, with its proof.

A holder decrypts a whole vector with its share (`partial_decrypt`) and proves, in one
batched Chaum-Pedersen proof, that it used that share; anyone with the public key checks
it (`verify_partial`). The scheme and the proof are described in
`flame.protocols.paillier.threshold`.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import gmpy2

from flame.protocols.paillier._math import Mpz, powmod_base_list
from flame.protocols.paillier.errors import (
    KeyMismatchError,
    SecureAggregationError,
    WireFormatError,
)
from flame.protocols.paillier.pool import available_cores
from flame.protocols.paillier.threshold_keys import ThresholdKeyShare, ThresholdPublicKey

__all__ = [
    "InvalidPartialError",
    "PartialDecryption",
    "partial_decrypt",
    "verify_partial",
]

_DOMAIN = b"flame-threshold-paillier-v1\0"
_RHO_BITS = 128
_CHALLENGE_BITS = 256
_STAT_BITS = 128


class InvalidPartialError(SecureAggregationError):
    """A partial decryption failed its proof; `node_id` names the share holder."""

    def __init__(self, message: str, *, node_id: str, index: int) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.index = index


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

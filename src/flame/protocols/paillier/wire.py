"""EncryptedVector: a packed ciphertext vector, its sum, and its validated wire form."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence

import gmpy2
from phe.paillier import PaillierPublicKey

from flame.protocols.paillier._math import Mpz
from flame.protocols.paillier.encoding import (
    _MAX_ABS_ENCODED,
    _MAX_NDIM,
    _MAX_NODES,
    _MAX_PRECISION,
    SlotLayout,
)
from flame.protocols.paillier.errors import (
    ContributorCountError,
    KeyMismatchError,
    SecureAggregationError,
    SpecMismatchError,
    WireFormatError,
)
from flame.protocols.paillier.keys import key_id

__all__ = ["EncryptedVector", "check_ciphertexts"]

_MAGIC = b"FLPV"
_VERSION = 1
_HEADER = struct.Struct(">4sBB8sBBHIIQQIHB")
"""magic, version, flags, key id, precision, slot_bytes, slots per ciphertext, max_nodes,
contributors, max_abs, value count, ciphertext count, ciphertext bytes, ndim; then ndim
u64 dimensions, then the ciphertexts, each exactly the byte length of n**2, big-endian."""
_DIM = struct.Struct(">Q")


class EncryptedVector:
    """A packed, encrypted vector (or the encrypted sum of several) under one public key.

    Carries what the receiver needs to check it before use: the key id, the shape, the
    slot layout and how many contributions the sum holds. Adding refuses to go past the
    layout's max_nodes, since beyond that a slot could carry into its neighbour.

    The constructor trusts its arguments; bytes from anyone else go through from_bytes,
    which validates them.
    """

    __slots__ = ("ciphertexts", "contributors", "key_id", "layout", "public_key", "shape")

    def __init__(
        self,
        public_key: PaillierPublicKey,
        layout: SlotLayout,
        shape: tuple[int, ...],
        contributors: int,
        ciphertexts: list[Mpz],
    ) -> None:
        size = math.prod(shape)
        if len(ciphertexts) != layout.ciphertexts_for(size):
            raise SecureAggregationError(
                f"{len(ciphertexts)} ciphertexts do not hold {size} values in this layout"
            )
        if not 1 <= contributors <= layout.max_nodes:
            raise ContributorCountError(
                f"{contributors} contributors, but the layout allows 1 to {layout.max_nodes}"
            )
        self.public_key = public_key
        self.key_id = key_id(public_key)
        self.layout = layout
        self.shape = shape
        self.contributors = contributors
        self.ciphertexts = ciphertexts

    @property
    def size(self) -> int:
        """Number of values (product of the shape)."""
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return (
            f"<EncryptedVector key {self.key_id} shape={self.shape} "
            f"contributors={self.contributors} ciphertexts={len(self.ciphertexts)}>"
        )

    def _check_compatible(self, other: EncryptedVector) -> None:
        if other.key_id != self.key_id:
            raise KeyMismatchError(
                f"cannot add ciphertexts under key {other.key_id} to ones under key {self.key_id}"
            )
        if other.layout != self.layout:
            raise SpecMismatchError("cannot add vectors encoded with different SecureSumSpecs")
        if other.shape != self.shape:
            raise SpecMismatchError(f"cannot add shape {other.shape} to shape {self.shape}")

    def __add__(self, other: EncryptedVector) -> EncryptedVector:
        if not isinstance(other, EncryptedVector):
            return NotImplemented
        return EncryptedVector.sum([self, other])

    def __radd__(self, other: object) -> EncryptedVector:
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self  # so that the builtin sum() works
        return NotImplemented

    @classmethod
    def sum(cls, vectors: Iterable[EncryptedVector]) -> EncryptedVector:
        """The encrypted sum: one multiplication modulo n**2 per ciphertext per vector.

        Refuses (ContributorCountError) if the contributions would exceed max_nodes,
        rather than let slots wrap.
        """
        items = list(vectors)
        if not items:
            raise SecureAggregationError("cannot sum zero encrypted vectors")
        first = items[0]
        for other in items[1:]:
            first._check_compatible(other)
        total = sum(v.contributors for v in items)
        if total > first.layout.max_nodes:
            raise ContributorCountError(
                f"a sum of {total} contributions exceeds max_nodes={first.layout.max_nodes} "
                "declared in the SecureSumSpec; refusing rather than risk a silent overflow"
            )
        nsquare = gmpy2.mpz(int(first.public_key.nsquare))
        acc = list(first.ciphertexts)
        for other in items[1:]:
            acc = [a * b % nsquare for a, b in zip(acc, other.ciphertexts, strict=True)]
        return cls(first.public_key, first.layout, first.shape, total, acc)

    def to_bytes(self) -> bytes:
        """Compact wire form: a small header and fixed-width big-endian ciphertexts."""
        width = (int(self.public_key.nsquare).bit_length() + 7) // 8
        layout = self.layout
        header = _HEADER.pack(
            _MAGIC,
            _VERSION,
            0,
            bytes.fromhex(self.key_id),
            layout.precision,
            layout.slot_bytes,
            layout.slots_per_ciphertext,
            layout.max_nodes,
            self.contributors,
            layout.max_abs,
            self.size,
            len(self.ciphertexts),
            width,
            len(self.shape),
        )
        dims = b"".join(_DIM.pack(d) for d in self.shape)
        return header + dims + b"".join(int(c).to_bytes(width, "big") for c in self.ciphertexts)

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, public_key: PaillierPublicKey
    ) -> EncryptedVector:
        """Parse and validate bytes from the wire; every failure is a WireFormatError
        (KeyMismatchError for another key) that says what was wrong.

        Checks magic, version, key id, layout consistency, counts, exact length, and every
        ciphertext: 0 < c < n**2 and gcd(c, n) = 1.
        """
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise WireFormatError(
                f"ciphertext vector truncated: {len(data)} bytes, header alone is {_HEADER.size}"
            )
        (
            magic,
            version,
            flags,
            kid,
            precision,
            slot_bytes,
            slots,
            max_nodes,
            contributors,
            max_abs,
            n_values,
            n_ct,
            width,
            ndim,
        ) = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise WireFormatError("not a flame ciphertext vector (bad magic bytes)")
        if version != _VERSION:
            raise WireFormatError(f"unsupported ciphertext vector version {version}")
        if flags != 0:
            raise WireFormatError("unsupported ciphertext vector flags")
        expected_kid = key_id(public_key)
        if kid.hex() != expected_kid:
            raise KeyMismatchError(
                f"ciphertext vector is under key {kid.hex()}, expected key {expected_kid}"
            )
        n = gmpy2.mpz(int(public_key.n))
        nsquare = n * n
        expected_width = (int(nsquare).bit_length() + 7) // 8
        if width != expected_width:
            raise WireFormatError(
                f"ciphertext width {width} bytes does not match the key ({expected_width})"
            )
        if ndim > _MAX_NDIM:
            raise WireFormatError(f"too many dimensions ({ndim})")
        if not (
            0 <= precision <= _MAX_PRECISION
            and 1 <= max_abs < _MAX_ABS_ENCODED
            and 1 <= max_nodes <= _MAX_NODES
        ):
            raise WireFormatError("slot layout parameters out of range")
        try:
            layout = SlotLayout.build(precision, max_abs, max_nodes, int(n).bit_length())
        except SecureAggregationError:
            raise WireFormatError("slot layout does not fit this key") from None
        if (slot_bytes, slots) != (layout.slot_bytes, layout.slots_per_ciphertext):
            raise WireFormatError("slot layout in the header is inconsistent")
        if not 1 <= contributors <= max_nodes:
            raise WireFormatError(
                f"contributor count {contributors} outside 1..max_nodes={max_nodes}"
            )
        dims_end = _HEADER.size + _DIM.size * ndim
        if len(data) < dims_end:
            raise WireFormatError("ciphertext vector truncated inside the shape")
        shape = tuple(_DIM.unpack_from(data, _HEADER.size + _DIM.size * i)[0] for i in range(ndim))
        if math.prod(shape) != n_values:
            raise WireFormatError(f"shape {shape} does not hold {n_values} values")
        if n_ct != layout.ciphertexts_for(n_values):
            raise WireFormatError(
                f"{n_ct} ciphertexts cannot hold {n_values} values "
                f"({layout.slots_per_ciphertext} per ciphertext)"
            )
        expected_len = dims_end + n_ct * width
        if len(data) != expected_len:
            what = "truncated" if len(data) < expected_len else "has trailing bytes"
            raise WireFormatError(
                f"ciphertext vector {what}: {len(data)} bytes, expected {expected_len}"
            )
        ciphertexts = [
            gmpy2.mpz(
                int.from_bytes(data[dims_end + i * width : dims_end + (i + 1) * width], "big")
            )
            for i in range(n_ct)
        ]
        check_ciphertexts(ciphertexts, n, nsquare)
        return cls(public_key, layout, shape, contributors, ciphertexts)


def check_ciphertexts(ciphertexts: Sequence[Mpz], n: Mpz, nsquare: Mpz) -> None:
    """0 < c < n**2 and gcd(c, n) = 1 for all; gcd once, on the product mod n (a prime
    factor of n divides the product iff it divides some c)."""
    product = gmpy2.mpz(1)
    for i, c in enumerate(ciphertexts):
        if not 0 < c < nsquare:
            raise WireFormatError(
                f"ciphertext {i} of {len(ciphertexts)} is out of range (need 0 < c < n^2)"
            )
        product = product * c % n
    if gmpy2.gcd(product, n) != 1:
        for i, c in enumerate(ciphertexts):
            if gmpy2.gcd(c, n) != 1:
                raise WireFormatError(
                    f"ciphertext {i} of {len(ciphertexts)} is not invertible modulo n "
                    "(gcd(c, n) != 1); it cannot be a Paillier ciphertext"
                )

"""Seeds -> masks: a ChaCha20 keystream (RFC 8439, from `cryptography`) read as integers mod
2**k. Every seed is first passed through HKDF-SHA256 with a label and the session binding, so
one seed never keys two streams.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flame.protocols.masking.errors import MaskingError

__all__ = ["RING_DTYPES", "derive_key", "expand_mask", "keystream"]

RING_DTYPES: dict[int, type[np.unsignedinteger]] = {32: np.uint32, 64: np.uint64}
"""Ring width k -> the numpy type whose wrap-around is arithmetic mod 2**k."""

_SEED_BYTES = 32


def derive_key(secret: bytes, label: bytes, context: bytes) -> bytes:
    """HKDF-SHA256(secret, info=label|0|context) -> a 32-byte ChaCha20 key."""
    if len(secret) < 16:
        raise MaskingError("a mask seed must have at least 16 bytes")
    return HKDF(hashes.SHA256(), _SEED_BYTES, salt=None, info=label + b"\0" + context).derive(
        secret
    )


def keystream(key: bytes, nbytes: int, *, nonce: bytes = bytes(12), counter: int = 0) -> bytes:
    """`nbytes` of the ChaCha20 keystream (RFC 8439: 32-bit block counter, 96-bit nonce)."""
    if len(key) != 32 or len(nonce) != 12:
        raise MaskingError("ChaCha20 needs a 32-byte key and a 12-byte nonce")
    if not 0 <= counter < 1 << 32 or nbytes < 0 or counter + (nbytes + 63) // 64 > 1 << 32:
        raise MaskingError("ChaCha20 block counter out of range")
    full = counter.to_bytes(4, "little") + nonce
    encryptor = Cipher(algorithms.ChaCha20(key, full), mode=None).encryptor()
    return encryptor.update(bytes(nbytes))


def expand_mask(key: bytes, length: int, bits: int) -> npt.NDArray[np.unsignedinteger]:
    """`length` uniform integers mod 2**bits (little-endian words of the keystream)."""
    dtype = RING_DTYPES.get(bits)
    if dtype is None:
        raise MaskingError(f"ring width must be one of {sorted(RING_DTYPES)} bits, not {bits}")
    raw = keystream(key, length * (bits // 8))
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype, copy=False)

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
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)  # the keystream is ChaCha20 applied to zeros, a chunk at a time


def derive_key(secret: bytes, label: bytes, context: bytes) -> bytes:
    """HKDF-SHA256(secret, info=label|0|context) -> a 32-byte ChaCha20 key."""
    if len(secret) < 16:
        raise MaskingError("a mask seed must have at least 16 bytes")
    return HKDF(hashes.SHA256(), _SEED_BYTES, salt=None, info=label + b"\0" + context).derive(
        secret
    )


def _stream_into(key: bytes, out: npt.NDArray[np.uint8], nbytes: int, full_nonce: bytes) -> None:
    encryptor = Cipher(algorithms.ChaCha20(key, full_nonce), mode=None).encryptor()
    view = out.data
    for start in range(0, nbytes, _CHUNK):
        size = min(_CHUNK, nbytes - start)
        # update_into may ask for room beyond `size`; `out` carries 64 bytes of slack
        encryptor.update_into(_ZEROS[:size] if size < _CHUNK else _ZEROS, view[start:])


def _raw_stream(key: bytes, nbytes: int, nonce: bytes, counter: int) -> npt.NDArray[np.uint8]:
    if len(key) != 32 or len(nonce) != 12:
        raise MaskingError("ChaCha20 needs a 32-byte key and a 12-byte nonce")
    if not 0 <= counter < 1 << 32 or nbytes < 0 or counter + (nbytes + 63) // 64 > 1 << 32:
        raise MaskingError("ChaCha20 block counter out of range")
    out = np.empty(nbytes + 64, dtype=np.uint8)
    _stream_into(key, out, nbytes, counter.to_bytes(4, "little") + nonce)
    return out


def keystream(key: bytes, nbytes: int, *, nonce: bytes = bytes(12), counter: int = 0) -> bytes:
    """`nbytes` of the ChaCha20 keystream (RFC 8439: 32-bit block counter, 96-bit nonce)."""
    return _raw_stream(key, nbytes, nonce, counter)[:nbytes].tobytes()


def expand_mask(key: bytes, length: int, bits: int) -> npt.NDArray[np.unsignedinteger]:
    """`length` uniform integers mod 2**bits (little-endian words of the keystream)."""
    dtype = RING_DTYPES.get(bits)
    if dtype is None:
        raise MaskingError(f"ring width must be one of {sorted(RING_DTYPES)} bits, not {bits}")
    nbytes = length * (bits // 8)
    raw = _raw_stream(key, nbytes, bytes(12), 0)[:nbytes]
    words: npt.NDArray[np.unsignedinteger] = raw.view(np.dtype(dtype).newbyteorder("<"))
    return words.astype(dtype, copy=False)

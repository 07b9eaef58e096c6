"""Seeds -> masks: a ChaCha20 keystream (RFC 8439, from `cryptography`) read as integers mod
2**k. Every seed is first passed through HKDF-SHA256 with a label and the session binding, so
one seed never keys two streams.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flame.protocols.masking.errors import MaskingError

__all__ = [
    "RING_DTYPES",
    "MaskTerm",
    "add_masks",
    "derive_key",
    "expand_mask",
    "keystream",
]

RING_DTYPES: dict[int, type[np.unsignedinteger]] = {32: np.uint32, 64: np.uint64}
"""Ring width k -> the numpy type whose wrap-around is arithmetic mod 2**k."""

_SEED_BYTES = 32
_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_CHUNK))  # the keystream is ChaCha20 applied to zeros, a chunk at a
# time; a memoryview, since slicing bytes would copy (and fault in) a fresh buffer per chunk


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
        encryptor.update_into(_ZEROS[:size], view[start:])


def _check(key: bytes, nbytes: int, nonce: bytes, counter: int) -> None:
    if len(key) != 32 or len(nonce) != 12:
        raise MaskingError("ChaCha20 needs a 32-byte key and a 12-byte nonce")
    if not 0 <= counter < 1 << 32 or nbytes < 0 or counter + (nbytes + 63) // 64 > 1 << 32:
        raise MaskingError("ChaCha20 block counter out of range")


def _raw_stream(key: bytes, nbytes: int, nonce: bytes, counter: int) -> npt.NDArray[np.uint8]:
    _check(key, nbytes, nonce, counter)
    out = np.empty(nbytes + 64, dtype=np.uint8)
    _stream_into(key, out, nbytes, counter.to_bytes(4, "little") + nonce)
    return out


def keystream(key: bytes, nbytes: int, *, nonce: bytes = bytes(12), counter: int = 0) -> bytes:
    """`nbytes` of the ChaCha20 keystream (RFC 8439: 32-bit block counter, 96-bit nonce)."""
    return _raw_stream(key, nbytes, nonce, counter)[:nbytes].tobytes()


def _dtype(bits: int) -> type[np.unsignedinteger]:
    dtype = RING_DTYPES.get(bits)
    if dtype is None:
        raise MaskingError(f"ring width must be one of {sorted(RING_DTYPES)} bits, not {bits}")
    return dtype


def expand_mask(key: bytes, length: int, bits: int) -> npt.NDArray[np.unsignedinteger]:
    """`length` uniform integers mod 2**bits (little-endian words of the keystream)."""
    dtype = _dtype(bits)
    nbytes = length * (bits // 8)
    raw = _raw_stream(key, nbytes, bytes(12), 0)[:nbytes]
    words: npt.NDArray[np.unsignedinteger] = raw.view(np.dtype(dtype).newbyteorder("<"))
    return words.astype(dtype, copy=False)


MaskTerm = tuple[bytes, int]
"""One mask to apply: (ChaCha20 key, +1 to add the keystream words or -1 to subtract them)."""

_BLOCK_BYTES = 1 << 18  # a block of every stream is made and added while it is in cache
_PARALLEL_WORDS = 1 << 22  # below this many words (masks x length), one thread does it all


def _apply(acc: npt.NDArray[np.unsignedinteger], masks: Sequence[MaskTerm], bits: int) -> None:
    width = bits // 8
    dtype = np.dtype(_dtype(bits)).newbyteorder("<")
    streams = [
        (Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor(), sign)
        for key, sign in masks
    ]
    scratch = np.empty(_BLOCK_BYTES + 64, dtype=np.uint8)  # 64 bytes of slack for update_into
    out = scratch.data
    step = _BLOCK_BYTES // width
    for start in range(0, acc.size, step):
        target = acc[start : start + step]
        nbytes = target.size * width
        words = scratch[:nbytes].view(dtype)
        for encryptor, sign in streams:  # each stream goes on where its last block ended
            encryptor.update_into(_ZEROS[:nbytes], out)
            if sign > 0:
                np.add(target, words, out=target)
            else:
                np.subtract(target, words, out=target)


def add_masks(
    acc: npt.NDArray[np.unsignedinteger],
    masks: Sequence[MaskTerm],
    bits: int,
    *,
    workers: int | None = None,
) -> None:
    """acc += sum(sign * expand_mask(key)) mod 2**bits, in place: each stream made a block at
    a time (no mask-sized buffer), and for many words the masks split over `workers`
    threads (default: up to 4 cores), which run at once: ChaCha20 and numpy release the
    GIL."""
    for key, sign in masks:
        if len(key) != 32 or sign not in (1, -1):
            raise MaskingError("a mask needs a 32-byte key and a sign of +1 or -1")
    if acc.dtype.kind != "u" or acc.dtype.itemsize != bits // 8 or acc.ndim != 1:
        raise MaskingError(f"masks of {bits} bits go onto a flat uint{bits} vector")
    _check(bytes(32), acc.size * (bits // 8), bytes(12), 0)
    if workers is None:
        big = acc.size * len(masks) >= _PARALLEL_WORDS
        workers = min(os.cpu_count() or 1, 4, len(masks)) if big else 1
    if workers <= 1 or len(masks) < 2:
        _apply(acc, masks, bits)
        return
    groups = [list(masks[i::workers]) for i in range(workers)]
    partial = [np.zeros_like(acc) for _ in groups[1:]]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flame-mask") as pool:
        done = [pool.submit(_apply, acc, groups[0], bits)]
        for part, group in zip(partial, groups[1:], strict=True):
            done.append(pool.submit(_apply, part, group, bits))
        for future in done:
            future.result()
    for part in partial:
        np.add(acc, part, out=acc)

"""Large frames over a broker built for small messages: chunking, and the claim-check seam.

Why chunks: brokers and their clients hold a whole message in memory several times over
(socket buffer, packet, queue, persistence); a 100 MB model update as one MQTT message
multiplies into many copies on every hop and blocks the connection for everyone else. Split
into `chunk_size` pieces it moves with a bounded window and is placed straight into one
`bytearray` on the receiving side, which `flame.messages.decode` turns into writable numpy
views without another copy.

Every chunk carries the whole manifest (transfer id, count, piece size, total size, SHA-256 of
the whole frame), so chunks may arrive in any order (redelivery after a reconnect reorders
them) and the first one to arrive can allocate the buffer. The magic differs from flame's
`b"FLM"` so a receiver tells the three frame kinds apart by their first three bytes.

The claim-check seam: a `ClaimCheck` (object storage, written elsewhere) takes the frame and
returns a reference; the wire then carries only `b"FLR"` + size + SHA-256 + reference.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from flame.errors import MessageError

__all__ = [
    "CHUNK_MAGIC",
    "REFERENCE_MAGIC",
    "ChunkError",
    "ClaimCheck",
    "Reassembler",
    "Reference",
    "decode_reference",
    "encode_reference",
    "frame_digest",
    "split_frame",
]

CHUNK_MAGIC = b"FLC"
REFERENCE_MAGIC = b"FLR"
CHUNK_VERSION = 1
# magic, version, transfer id, index, count, piece size, total size, sha256 of the whole
_CHUNK = struct.Struct(">3sB16sIIIQ32s")
# magic, version, total size, sha256 of the whole, reference length (reference follows)
_REFERENCE = struct.Struct(">3sBQ32sH")
CHUNK_HEADER_SIZE = _CHUNK.size
MAX_REFERENCE_BYTES = 4096

Buffer = bytes | bytearray | memoryview


class ChunkError(MessageError):
    """A chunk or reference frame is malformed or cannot be accepted; it is dropped."""


@runtime_checkable
class ClaimCheck(Protocol):
    """Where frames too large for the broker go instead (object storage).

    `put` stores the frame (given as buffers, so a large array is not joined first) and returns
    a reference of at most 4096 UTF-8 bytes; `fetch` returns the frame as a `bytearray` (so
    numpy arrays decode as writable views) or raises. The transport verifies size and SHA-256,
    so an implementation need not. Deleting stored objects is the implementation's policy.
    """

    def put(self, parts: Sequence[Buffer], size: int, sha256: bytes) -> str: ...

    def fetch(self, reference: str, size: int) -> bytearray: ...


def frame_size(parts: Sequence[Buffer]) -> int:
    return sum(memoryview(part).nbytes for part in parts)


def frame_digest(parts: Sequence[Buffer]) -> bytes:
    """SHA-256 over the buffers as if joined, without joining them."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.digest()


def split_frame(
    parts: Sequence[Buffer],
    piece: int,
    *,
    transfer_id: bytes | None = None,
    sha256: bytes | None = None,
) -> Iterator[bytearray]:
    """Chunk frames for the buffers `parts`, made one at a time so memory stays one chunk."""
    if piece < 1:
        raise ValueError("chunk piece size must be at least 1 byte")
    views = [memoryview(part).cast("B") for part in parts]
    total = sum(view.nbytes for view in views)
    count = max(1, -(-total // piece))
    if count > 0xFFFFFFFF or piece > 0xFFFFFFFF:
        raise ValueError(f"a frame of {total} bytes needs more chunks than the format allows")
    transfer = transfer_id if transfer_id is not None else os.urandom(16)
    if len(transfer) != 16:
        raise ValueError("transfer id must be 16 bytes")
    digest = sha256 if sha256 is not None else frame_digest(views)
    part_index, part_offset = 0, 0
    for index in range(count):
        length = min(piece, total - index * piece)
        out = bytearray(_CHUNK.size + length)
        _CHUNK.pack_into(
            out, 0, CHUNK_MAGIC, CHUNK_VERSION, transfer, index, count, piece, total, digest
        )
        position = _CHUNK.size
        while position < len(out):
            view = views[part_index]
            take = min(view.nbytes - part_offset, len(out) - position)
            out[position : position + take] = view[part_offset : part_offset + take]
            position += take
            part_offset += take
            if part_offset == view.nbytes:
                part_index, part_offset = part_index + 1, 0
        yield out


@dataclass
class _Transfer:
    count: int
    piece: int
    total: int
    digest: bytes
    buffer: bytearray
    received: bytearray  # one flag byte per chunk
    missing: int
    last_activity: float


class Reassembler:
    """Collects chunk frames into whole frames, within limits a hostile sender cannot exceed.

    Limits: one transfer at most `max_bytes`; at most `max_transfers` open at once and
    `max_total_bytes` allocated over all of them; a transfer without progress for `timeout`
    seconds is dropped and its memory freed. A transfer that was refused or expired is
    remembered for a while, so its remaining chunks are dropped quietly (one log line per
    transfer, not per chunk), and so are late duplicates of a completed transfer.
    """

    def __init__(
        self,
        *,
        max_bytes: int,
        timeout: float,
        max_transfers: int = 64,
        max_total_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_transfers = max_transfers
        self.max_total_bytes = max_total_bytes if max_total_bytes is not None else 2 * max_bytes
        self._clock = clock
        self._open: dict[bytes, _Transfer] = {}
        self._closed: OrderedDict[bytes, float] = OrderedDict()  # transfer id -> forget after
        self.pending_bytes = 0

    @property
    def open_transfers(self) -> int:
        return len(self._open)

    def add(self, chunk: Buffer) -> bytearray | None:
        """Place one chunk. Returns the verified whole frame when this chunk completed it.

        Raises ChunkError for a malformed chunk or a transfer that cannot be accepted; chunks of
        an already refused, expired or completed transfer return None without an error.
        """
        view = memoryview(chunk).cast("B")
        if view.nbytes < _CHUNK.size:
            raise ChunkError(f"chunk of {view.nbytes} bytes is shorter than a chunk header")
        magic, version, transfer_id, index, count, piece, total, digest = _CHUNK.unpack_from(view)
        if magic != CHUNK_MAGIC:
            raise ChunkError("not a chunk frame (bad magic bytes)")
        if version != CHUNK_VERSION:
            raise ChunkError(f"chunk format version {version} is not supported")
        now = self._clock()
        self._forget_closed(now)
        if transfer_id in self._closed:
            return None
        if total == 0 or piece == 0 or count != -(-total // piece) or index >= count:
            raise ChunkError(
                f"chunk manifest is inconsistent (index {index}, count {count}, "
                f"piece {piece}, total {total})"
            )
        data = view[_CHUNK.size :]
        expected = min(piece, total - index * piece)
        if data.nbytes != expected:
            raise ChunkError(f"chunk {index} carries {data.nbytes} bytes, expected {expected}")
        transfer = self._open.get(transfer_id)
        if transfer is None:
            transfer = self._start(transfer_id, count, piece, total, digest, now)
        elif (transfer.count, transfer.piece, transfer.total, transfer.digest) != (
            count,
            piece,
            total,
            digest,
        ):
            raise ChunkError("chunk manifest differs from the earlier chunks of its transfer")
        transfer.last_activity = now
        if transfer.received[index]:
            return None
        start = index * piece
        transfer.buffer[start : start + expected] = data
        transfer.received[index] = 1
        transfer.missing -= 1
        if transfer.missing:
            return None
        self._close(transfer_id, now)
        if hashlib.sha256(transfer.buffer).digest() != transfer.digest:
            raise ChunkError(f"reassembled frame of {total} bytes fails its SHA-256 check")
        return transfer.buffer

    def _start(
        self, transfer_id: bytes, count: int, piece: int, total: int, digest: bytes, now: float
    ) -> _Transfer:
        refusal = None
        if total > self.max_bytes:
            refusal = f"transfer of {total} bytes is over the message limit of {self.max_bytes}"
        elif len(self._open) >= self.max_transfers:
            refusal = f"{len(self._open)} transfers are already open (limit {self.max_transfers})"
        elif self.pending_bytes + total > self.max_total_bytes:
            refusal = (
                f"transfer of {total} bytes would exceed the reassembly budget "
                f"({self.pending_bytes} of {self.max_total_bytes} bytes in use)"
            )
        if refusal is not None:
            self._remember(transfer_id, now)
            raise ChunkError(refusal)
        transfer = _Transfer(
            count=count,
            piece=piece,
            total=total,
            digest=digest,
            buffer=bytearray(total),
            received=bytearray(count),
            missing=count,
            last_activity=now,
        )
        self._open[transfer_id] = transfer
        self.pending_bytes += total
        return transfer

    def expire(self) -> list[str]:
        """Drop transfers idle for longer than the timeout; one description per dropped one."""
        now = self._clock()
        dropped = []
        for transfer_id, transfer in list(self._open.items()):
            if now - transfer.last_activity > self.timeout:
                self._close(transfer_id, now)
                dropped.append(
                    f"transfer {transfer_id.hex()[:12]} of {transfer.total} bytes "
                    f"({transfer.count - transfer.missing}/{transfer.count} chunks after "
                    f"{self.timeout:g} s idle)"
                )
        self._forget_closed(now)
        return dropped

    def _close(self, transfer_id: bytes, now: float) -> None:
        transfer = self._open.pop(transfer_id, None)
        if transfer is not None:
            self.pending_bytes -= transfer.total
        self._remember(transfer_id, now)

    def _remember(self, transfer_id: bytes, now: float) -> None:
        self._closed[transfer_id] = now + max(2 * self.timeout, 60.0)
        self._closed.move_to_end(transfer_id)
        while len(self._closed) > 4096:
            self._closed.popitem(last=False)

    def _forget_closed(self, now: float) -> None:
        while self._closed:
            transfer_id, until = next(iter(self._closed.items()))
            if until > now:
                break
            del self._closed[transfer_id]


@dataclass(frozen=True)
class Reference:
    """What a claim-check frame carries instead of the payload."""

    reference: str
    size: int
    sha256: bytes


def encode_reference(reference: str, size: int, sha256: bytes) -> bytes:
    raw = reference.encode()
    if not raw or len(raw) > MAX_REFERENCE_BYTES:
        raise ValueError(f"claim-check reference must be 1..{MAX_REFERENCE_BYTES} UTF-8 bytes")
    if len(sha256) != 32:
        raise ValueError("sha256 must be 32 bytes")
    return _REFERENCE.pack(REFERENCE_MAGIC, CHUNK_VERSION, size, sha256, len(raw)) + raw


def decode_reference(frame: Buffer) -> Reference:
    view = memoryview(frame).cast("B")
    if view.nbytes < _REFERENCE.size:
        raise ChunkError("claim-check frame is shorter than its header")
    magic, version, size, digest, length = _REFERENCE.unpack_from(view)
    if magic != REFERENCE_MAGIC:
        raise ChunkError("not a claim-check frame (bad magic bytes)")
    if version != CHUNK_VERSION:
        raise ChunkError(f"claim-check format version {version} is not supported")
    if length == 0 or length > MAX_REFERENCE_BYTES or view.nbytes != _REFERENCE.size + length:
        raise ChunkError("claim-check reference length does not match the frame")
    try:
        reference = bytes(view[_REFERENCE.size :]).decode()
    except UnicodeDecodeError:
        raise ChunkError("claim-check reference is not UTF-8") from None
    return Reference(reference, size, bytes(digest))

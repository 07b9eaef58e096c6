"""Large frames over a broker built for small messages: chunking, and the claim-check seam.

Why chunks: brokers and their clients hold a whole message in memory several times over
(socket buffer, packet, queue, persistence); a 100 MB model update as one MQTT message
multiplies into many copies on every hop and blocks the connection for everyone else. Split
into `chunk_size` pieces it moves with a bounded window and is placed straight into one
`bytearray` on the receiving side, which `flame.wire.envelope.decode` turns into writable numpy
views without another copy.

Every chunk carries the whole manifest (transfer id, count, piece size, total size, SHA-256 of
the whole frame), so chunks may arrive in any order (redelivery after a reconnect reorders
them) and the first one to arrive can allocate the buffer. The magic differs from flame's
`b"FLM"` so a receiver tells the three frame kinds apart by their first three bytes.

Why signed manifests (version 2): reassembly happens before the envelope's signature can be
checked, so an unsigned manifest lets anyone who can publish on the broker make a node hold
`max_total_bytes` for transfers that never finish, which also locks out honest ones. A signed
node signs the manifest once per transfer (signer id + Ed25519 signature after the header,
the same on every chunk); the receiver checks it once, on the first chunk of a transfer and
before allocating, so a forged first chunk costs it one signature check and no memory. The
per-sender limits then keep one roster member from taking the budget of all the others.
Version 1 (no signature) is what unsigned nodes send; a signed receiver refuses it.

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
    "chunk_header_size",
    "frame_digest",
    "split_frame",
]

CHUNK_MAGIC = b"FLC"
REFERENCE_MAGIC = b"FLR"
CHUNK_VERSION = 1
SIGNED_CHUNK_VERSION = 2  # + u8 len(signer) | signer | 64-byte signature of the manifest
# magic, version, transfer id, index, count, piece size, total size, sha256 of the whole
_CHUNK = struct.Struct(">3sB16sIIIQ32s")
_MANIFEST = struct.Struct(">16sIIQ32s")  # what a signed chunk's signature covers (no index)
_SIGNATURE_BYTES = 64
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


ManifestSigner = Callable[[bytes], tuple[str, bytes]]
"""`manifest -> (signer id, 64-byte signature)`: how a signed sender seals its chunks."""

ManifestCheck = Callable[[str, bytes, bytes], str | None]
"""`(signer, manifest, signature) -> why it is refused, or None`: a signed receiver's check."""


def chunk_header_size(signer: str | None = None) -> int:
    """Header bytes of each chunk: unsigned (version 1), or signed by `signer` (version 2)."""
    if signer is None:
        return _CHUNK.size
    return _CHUNK.size + 1 + len(signer.encode()) + _SIGNATURE_BYTES


def chunk_manifest(transfer_id: bytes, count: int, piece: int, total: int, digest: bytes) -> bytes:
    """The bytes a signed chunk's signature covers: everything in its header but the index."""
    return _MANIFEST.pack(transfer_id, count, piece, total, digest)


def split_frame(
    parts: Sequence[Buffer],
    piece: int,
    *,
    transfer_id: bytes | None = None,
    sha256: bytes | None = None,
    sign: ManifestSigner | None = None,
) -> Iterator[bytearray]:
    """Chunk frames for the buffers `parts`, made one at a time so memory stays one chunk.

    With `sign`, the manifest is signed once and every chunk carries the signature."""
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
    version, seal = CHUNK_VERSION, b""
    if sign is not None:
        signer, signature = sign(chunk_manifest(transfer, count, piece, total, digest))
        name = signer.encode()
        if not 0 < len(name) < 256 or len(signature) != _SIGNATURE_BYTES:
            raise ValueError("a chunk signer id must be 1..255 bytes, its signature 64")
        version, seal = SIGNED_CHUNK_VERSION, bytes([len(name)]) + name + signature
    header = _CHUNK.size + len(seal)
    part_index, part_offset = 0, 0
    for index in range(count):
        length = min(piece, total - index * piece)
        out = bytearray(header + length)
        _CHUNK.pack_into(out, 0, CHUNK_MAGIC, version, transfer, index, count, piece, total, digest)
        out[_CHUNK.size : header] = seal
        position = header
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
    seal: bytes  # signer and signature (empty for an unsigned chunk)
    sender: str | None  # whose budget it counts against (None: unsigned, nobody's)
    buffer: bytearray
    received: bytearray  # one flag byte per chunk
    missing: int
    last_activity: float


_REMEMBERED = 16384  # closed / refused transfer ids kept (about 100 bytes each)


class Reassembler:
    """Collects chunk frames into whole frames, within limits a hostile sender cannot exceed.

    Limits: one transfer at most `max_bytes` (its declared total is checked before anything is
    allocated); at most `max_transfers` open at once and `max_total_bytes` allocated over all
    of them, and per sender (signed chunks) at most `max_sender_transfers` and
    `max_sender_bytes`; a transfer without progress (a new chunk; duplicates do not count) for
    `timeout` seconds is dropped and its memory freed. Nothing open is ever evicted for a
    newcomer. With `check` (a signed node), a chunk's manifest must carry a valid signature of
    a roster member, verified when its transfer would be opened: forged chunks are refused
    before any buffering. A transfer that was refused or expired is remembered for a while, so
    its remaining chunks are dropped quietly (one log line per transfer, not per chunk), and so
    are late duplicates of a completed transfer.
    """

    def __init__(
        self,
        *,
        max_bytes: int,
        timeout: float,
        max_transfers: int = 64,
        max_total_bytes: int | None = None,
        max_sender_transfers: int | None = None,
        max_sender_bytes: int | None = None,
        check: ManifestCheck | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_transfers = max_transfers
        self.max_total_bytes = max_total_bytes if max_total_bytes is not None else 2 * max_bytes
        self.max_sender_transfers = (
            max_sender_transfers
            if max_sender_transfers is not None
            else max(2, max_transfers // 4)
        )
        self.max_sender_bytes = (
            max_sender_bytes
            if max_sender_bytes is not None
            else max(max_bytes, self.max_total_bytes // 2)
        )
        self.check = check
        self._clock = clock
        self._open: dict[bytes, _Transfer] = {}
        self._closed: OrderedDict[bytes, float] = OrderedDict()  # transfer id -> forget after
        # Refused for a bad signature: keyed by id + seal, so a forgery that reuses an honest
        # transfer id does not get the honest chunks (another seal) dropped with it.
        self._refused: OrderedDict[bytes, float] = OrderedDict()
        self._senders: dict[str, tuple[int, int]] = {}  # sender -> (open transfers, bytes)
        self.pending_bytes = 0
        self.refused = 0  # transfers refused (limits, signature)

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
        header = _CHUNK.size
        if version == SIGNED_CHUNK_VERSION:
            length = view[header] if view.nbytes > header else 0
            header += 1 + length + _SIGNATURE_BYTES
            if length == 0 or view.nbytes < header:
                raise ChunkError("signed chunk is shorter than its header")
        elif version != CHUNK_VERSION:
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
        data = view[header:]
        expected = min(piece, total - index * piece)
        if data.nbytes != expected:
            raise ChunkError(f"chunk {index} carries {data.nbytes} bytes, expected {expected}")
        seal = bytes(view[_CHUNK.size : header])
        transfer = self._open.get(transfer_id)
        if transfer is None:
            if transfer_id + seal in self._refused:
                return None
            transfer = self._start(transfer_id, count, piece, total, digest, seal, now)
        elif (transfer.count, transfer.piece, transfer.total, transfer.digest, transfer.seal) != (
            count,
            piece,
            total,
            digest,
            seal,
        ):
            raise ChunkError("chunk manifest differs from the earlier chunks of its transfer")
        if transfer.received[index]:
            return None  # a duplicate is no progress: it does not keep a transfer alive
        transfer.last_activity = now
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
        self,
        transfer_id: bytes,
        count: int,
        piece: int,
        total: int,
        digest: bytes,
        seal: bytes,
        now: float,
    ) -> _Transfer:
        sender: str | None = None
        if seal:
            try:
                sender = bytes(seal[1 : 1 + seal[0]]).decode()
            except UnicodeDecodeError:
                sender = None
        refusal = None
        if self.check is not None:
            if sender is None:
                refusal = "unsigned chunk (a signed node accepts signed chunk manifests only)"
            else:
                refusal = self.check(
                    sender, chunk_manifest(transfer_id, count, piece, total, digest), seal[-64:]
                )
            if refusal is not None:
                self.refused += 1
                self._refused[transfer_id + seal] = now + max(2 * self.timeout, 60.0)
                self._trim(self._refused)
                who = "?" if sender is None else repr(sender[:64])
                raise ChunkError(f"chunk manifest claiming to be from {who}: {refusal}")
        held, held_bytes = self._senders.get(sender, (0, 0)) if sender is not None else (0, 0)
        if total > self.max_bytes:
            refusal = f"transfer of {total} bytes is over the message limit of {self.max_bytes}"
        elif len(self._open) >= self.max_transfers:
            refusal = f"{len(self._open)} transfers are already open (limit {self.max_transfers})"
        elif self.pending_bytes + total > self.max_total_bytes:
            refusal = (
                f"transfer of {total} bytes would exceed the reassembly budget "
                f"({self.pending_bytes} of {self.max_total_bytes} bytes in use)"
            )
        elif sender is not None and held >= self.max_sender_transfers:
            refusal = (
                f"{sender!r} already has {held} transfers open "
                f"(limit {self.max_sender_transfers})"
            )
        elif sender is not None and held_bytes + total > self.max_sender_bytes:
            refusal = (
                f"transfer of {total} bytes from {sender!r} would exceed its reassembly budget "
                f"({held_bytes} of {self.max_sender_bytes} bytes in use)"
            )
        if refusal is not None:
            self.refused += 1
            self._remember(transfer_id, now)
            raise ChunkError(refusal)
        transfer = _Transfer(
            count=count,
            piece=piece,
            total=total,
            digest=digest,
            seal=seal,
            sender=sender,
            buffer=bytearray(total),
            received=bytearray(count),
            missing=count,
            last_activity=now,
        )
        self._open[transfer_id] = transfer
        self.pending_bytes += total
        if sender is not None:
            self._senders[sender] = (held + 1, held_bytes + total)
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
            if transfer.sender is not None:
                held, held_bytes = self._senders.pop(transfer.sender, (1, transfer.total))
                if held > 1:
                    self._senders[transfer.sender] = (held - 1, held_bytes - transfer.total)
        self._remember(transfer_id, now)

    def _remember(self, transfer_id: bytes, now: float) -> None:
        self._closed[transfer_id] = now + max(2 * self.timeout, 60.0)
        self._closed.move_to_end(transfer_id)
        self._trim(self._closed)

    @staticmethod
    def _trim(remembered: OrderedDict[bytes, float]) -> None:
        while len(remembered) > _REMEMBERED:
            remembered.popitem(last=False)

    def _forget_closed(self, now: float) -> None:
        for remembered in (self._closed, self._refused):
            while remembered:
                key, until = next(iter(remembered.items()))
                if until > now:
                    break
                del remembered[key]


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

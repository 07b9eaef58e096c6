"""Claim check: a frame too large for the broker goes to object storage, and the message
carries only its key, size and SHA-256 (the transport verifies both on arrival).

Sender and receivers must share the store (a hub MinIO, for instance), so it is opt-in:
`FLAME_STORAGE__CLAIM_CHECK=true`. Without it, large frames travel as chunks.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence

from flame.clients.object_store import AnalysisLayout, ObjectStore
from flame.wire.chunks import Buffer

__all__ = ["StorageClaimCheck"]


class _PartsReader(io.RawIOBase):
    """The frame's buffers as one seekable stream, so it is uploaded without being joined."""

    def __init__(self, parts: Sequence[Buffer]) -> None:
        self._parts = [memoryview(p).cast("B") for p in parts]
        self._size = sum(p.nbytes for p in self._parts)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = min(max(base + offset, 0), self._size)
        return self._position

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        target = memoryview(buffer).cast("B")
        written = 0
        start = 0
        for part in self._parts:
            end = start + part.nbytes
            if self._position < end and written < target.nbytes:
                offset = self._position - start
                count = min(part.nbytes - offset, target.nbytes - written)
                target[written : written + count] = part[offset : offset + count]
                written += count
                self._position += count
            start = end
        return written


class StorageClaimCheck:
    """`ClaimCheck` on an `ObjectStore`, under the analysis's payloads/ prefix."""

    def __init__(self, store: ObjectStore, analysis_id: str, node_id: str) -> None:
        self.store = store
        self.layout = AnalysisLayout(analysis_id)
        self.node_id = node_id
        store.ensure_bucket()

    def put(self, parts: Sequence[Buffer], size: int, sha256: bytes) -> str:
        key = self.layout.payload(self.node_id, uuid.uuid4().hex)
        with _PartsReader(parts) as stream:
            self.store.put_stream(key, stream)  # type: ignore[arg-type]
        return key

    def fetch(self, reference: str, size: int) -> bytearray:
        if not reference.startswith(self.layout.root):
            raise ValueError("claim-check reference outside this analysis")
        # never more than the reference declares into memory (a reference may name any
        # object of the analysis, and the declared size is already within the limit)
        return bytearray(self.store.get_bytes(reference, max_bytes=size))

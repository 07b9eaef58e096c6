"""Framed messages between the node runtime and its analysis child, no pickle.

Each message is a flame envelope frame (`flame.wire.envelope`) on a Unix stream socket, preceded
by a 9-byte header: a mode byte and the frame length. Large frames (Linux) travel in a memfd
whose descriptor is passed with SCM_RIGHTS: the receiver maps it and decodes arrays as views
of the mapping, so a big numpy result crosses without being copied through the socket.
A small frame may also carry open file descriptors (the node's data files, opened read-only
by the parent); only a channel built with `accept_descriptors=True` (the child's) keeps
them, in `passed`, for the caller to take; anyone else's are closed and the frame refused.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct
from typing import Any

from flame.errors import MessageError
from flame.wire.envelope import DEFAULT_MAX_BYTES, Envelope, decode, encode_parts

__all__ = ["Channel", "ChannelClosed"]

_HEAD = struct.Struct(">BQ")
_INLINE, _MEMFD, _PASSED = 0, 1, 2
_MAX_PASSED = 4
SHARED_THRESHOLD = 256 * 1024
_MAX_INLINE = 64 * 1024 * 1024


_SEALS = getattr(fcntl, "F_SEAL_WRITE", 8) | getattr(fcntl, "F_SEAL_SHRINK", 2)
_SEALS |= getattr(fcntl, "F_SEAL_GROW", 4)


def _check_sealed(fd: int, size: int) -> None:
    """Refuse a shared-memory frame the sender could still rewrite or truncate after we
    checked it (a rewrite changes a result after the policy passed it; a truncation makes
    the next touch of its arrays kill this process with SIGBUS)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise MessageError("shared-memory frame is not a sealable memfd") from None
    if seals & _SEALS != _SEALS:
        raise MessageError("shared-memory frame is not sealed against writes and resizing")
    if os.fstat(fd).st_size < size:
        raise MessageError("shared-memory frame is shorter than announced")


class ChannelClosed(EOFError):
    """The other side closed the socket (or died)."""


def _memfd_supported() -> bool:
    return (
        hasattr(os, "memfd_create")
        and hasattr(socket, "send_fds")
        and hasattr(fcntl, "F_ADD_SEALS")
    )


class Channel:
    """One end of the parent/child socket: `send(op, body)`, `receive() -> (op, body)`."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_bytes: int = 1 << 40,
        max_items: int | None = None,
        accept_descriptors: bool = False,
    ) -> None:
        self.sock = sock
        self.max_bytes = max_bytes
        self.max_items = max_items  # JSON values per frame (the runtime's: a child's frames)
        self.shared = _memfd_supported() and sock.family == socket.AF_UNIX
        self.accept_descriptors = accept_descriptors
        self.passed: list[int] = []  # descriptors of the last frame (accept_descriptors)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def send(self, op: str, body: Any = None, *, descriptors: list[int] | None = None) -> None:
        parts = encode_parts(Envelope("flame", "node", "node", "message", 0, body, op))
        size = sum(memoryview(p).nbytes for p in parts)
        if descriptors:  # inline frame, descriptors ride on its header (the receiver dups)
            socket.send_fds(self.sock, [_HEAD.pack(_PASSED, size)], descriptors)
            for part in parts:
                self.sock.sendall(part)
            return
        if self.shared and size >= SHARED_THRESHOLD:
            fd = os.memfd_create("flame-frame", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                _write_all(fd, parts)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
                socket.send_fds(self.sock, [_HEAD.pack(_MEMFD, size)], [fd])
            finally:
                os.close(fd)
            return
        self.sock.sendall(_HEAD.pack(_INLINE, size))
        for part in parts:
            self.sock.sendall(part)

    def receive(self, timeout: float | None = None) -> tuple[str, Any]:
        """The next message; `TimeoutError` after `timeout` s, `ChannelClosed` at EOF."""
        self.sock.settimeout(timeout)
        data, fds, _flags, _addr = socket.recv_fds(self.sock, _HEAD.size, _MAX_PASSED)
        kept: list[int] = []
        try:
            if not data:
                raise ChannelClosed("the other side closed the channel")
            self.sock.settimeout(None)  # a frame has begun: read all of it (EOF if it dies)
            head = data + self._exactly(_HEAD.size - len(data)) if len(data) < _HEAD.size else data
            mode, size = _HEAD.unpack(head)
            if size > self.max_bytes:
                raise MessageError(f"channel frame of {size} bytes is over the limit")
            if mode == _MEMFD:
                if len(fds) != 1:
                    raise MessageError("shared-memory frame without its descriptor")
                _check_sealed(fds[0], size)
                # A private copy-on-write mapping of a sealed memfd: arrays decode as
                # writable views of it, and nobody can change or shrink it under them.
                frame: Any = mmap.mmap(fds[0], size, flags=mmap.MAP_PRIVATE)
            elif mode == _INLINE and not fds and size <= _MAX_INLINE:
                frame = bytearray(size)
                self._into(memoryview(frame))
            elif mode == _PASSED and fds and self.accept_descriptors and size <= _MAX_INLINE:
                frame = bytearray(size)
                self._into(memoryview(frame))
                kept = list(fds)
            else:
                raise MessageError("malformed channel frame header")
        finally:
            for fd in fds:
                if fd not in kept:
                    os.close(fd)
        try:
            # frames may be huge (arrays in a memfd); a table's decoded size is capped like a
            # broker message's: a hostile child's few-byte table must not inflate here
            tables = min(self.max_bytes, DEFAULT_MAX_BYTES)
            envelope = decode(
                frame, max_bytes=self.max_bytes, max_table_bytes=tables, max_items=self.max_items
            )
        except MessageError:
            for fd in kept:
                os.close(fd)
            raise
        self.passed = kept
        return envelope.category or "", envelope.body

    def _exactly(self, count: int) -> bytes:
        buffer = bytearray(count)
        self._into(memoryview(buffer))
        return bytes(buffer)

    def _into(self, view: memoryview) -> None:
        while view.nbytes:
            got = self.sock.recv_into(view)
            if got == 0:
                raise ChannelClosed("the other side closed the channel mid-frame")
            view = view[got:]


def _write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    for part in parts:
        view = memoryview(part).cast("B")
        while view.nbytes:
            written = os.write(fd, view)
            view = view[written:]

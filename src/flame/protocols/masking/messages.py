"""Protocol messages: bound to (analysis, epoch, field, run, round, sender) and signed.

Which are signed: with a roster, every message a third party acts on (`FORWARDED`: a key
advertisement, a consistency signature, a peer statement) always carries its sender's
signature, since the aggregator relays it and only that signature vouches for it. A
point-to-point message (`POINT_TO_POINT`) carries one only when no carrier authenticates
it: in a flame run with a roster its envelope is already signed by the same identity key
over the same bytes, so the parties run in carrier-authenticated mode and the receiver
pins the sender the carrier verified instead (`open_message(carrier=...)`).

Wire form: b"FLMK" | u8 version | u32 len(header) | header | u64 len(vector) | vector |
u8 len(signature) | signature. The header is canonical JSON (sorted keys, no spaces) of the
binding, round, sender and body; the vector is the masked input, raw little-endian words.
The Ed25519 signature is over b"flame-masking-v1\\0" + SHA-256(header) + SHA-256(vector),
so a message relabelled for another analysis, epoch, field, run, round or sender no longer
verifies, and one replayed into another session fails the binding check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from flame.protocols.masking.errors import ProtocolViolation

__all__ = [
    "FORWARDED",
    "POINT_TO_POINT",
    "ROUNDS",
    "Binding",
    "Message",
    "b64d",
    "b64e",
    "open_message",
]

MAGIC = b"FLMK"
VERSION = 1
_HEAD = struct.Struct(">4sBI")
_VECTOR_LEN = struct.Struct(">Q")
_CONTEXT = b"flame-masking-v1\0"
DEFAULT_MAX_BYTES = 1 << 31
_HEADER_FIELDS = {"analysis", "epoch", "field", "round", "sender", "body"}  # and "run" if any

ROUNDS = (
    "advertise",  # node -> server: its two public keys
    "keys",  # server -> node: the signed advertisements of U1
    "shares",  # node -> server: encrypted Shamir shares for each other node of U1
    "ciphertexts",  # server -> node: the shares addressed to it, from U2
    "masked",  # node -> server: the masked input, with its signed "peers" statement
    "peers",  # node -> holders via the server (inside "masked"): whom it did not mask with
    "survivors",  # server -> node: U3, the nodes whose masked input arrived
    "consistency",  # node -> server: its signature on U3
    "unmask",  # server -> node: U3, the signatures of U4, which share of whom it wants
    "reveal",  # node -> server: the requested shares
)

FORWARDED = frozenset({"advertise", "consistency", "peers"})
"""Relayed by the aggregator to other nodes: always signed in signed mode."""
POINT_TO_POINT = frozenset(ROUNDS) - FORWARDED
"""Read only by their one recipient: unsigned when the carrier authenticates the sender."""


class _Verified:
    """Signatures that verified, remembered by SHA-256(public key | digest | signature) in a
    bounded, process-wide set. When the nodes of a simulation share one process, the
    advertisements and consistency signatures that every node checks are then verified once
    (the server already did); a node in a process of its own never sees one triple twice,
    and only a successful verification is ever remembered."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def has(self, entry: bytes) -> bool:
        with self._lock:
            return entry in self._seen

    def add(self, entry: bytes) -> None:
        with self._lock:
            self._seen[entry] = None
            if len(self._seen) > self._limit:
                self._seen.popitem(last=False)


_VERIFIED = _Verified(1 << 14)


_MAX_DEPTH = 16  # a protocol body nests 3 deep; deeper is refused before it is walked


def _depth(value: Any) -> int:
    """How deep `value` (parsed JSON) nests, walked without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        deepest = max(deepest, level)
        if level > _MAX_DEPTH:
            break
        if isinstance(item, dict):
            todo.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            todo.extend((v, level + 1) for v in item)
    return deepest


def _copy(value: Any) -> Any:
    """A private copy of a parsed JSON body (its depth already bounded by from_bytes)."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value  # str, int, float, bool, None: immutable


class _Parsed:
    """Forwarded messages (advertisements, consistency signatures, peer statements) parsed
    once per process: bytes -> (the message and its signed digest), bounded. When the nodes
    of a simulation share one process, every node opens the same relayed bytes; each still
    runs every check of `open_message` (binding, round, sender, signature), only the parse
    and the digest are reused, and each reader gets a body of its own: the kept one is
    never handed out, so nothing a reader does to its body reaches another. Kept only once
    a message passed those checks (junk cannot fill it), and only small ones without a
    vector; a point-to-point message is read once and never kept."""

    MAX_BYTES = 16 * 1024

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: OrderedDict[bytes, tuple[Message, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def parse(self, data: bytes | bytearray | memoryview) -> tuple[Message, bytes | None, bool]:
        """The message of `data`, its digest when known (else None) and whether it may be
        kept (`keep`, after its checks)."""
        if type(data) is not bytes or len(data) > self.MAX_BYTES:
            return Message.from_bytes(data), None, False
        with self._lock:
            hit = self._seen.get(data)
        if hit is not None:
            return replace(hit[0], body=_copy(hit[0].body)), hit[1], False
        msg = Message.from_bytes(data)
        if msg.round not in FORWARDED or len(msg.vector):
            return msg, None, False
        msg = replace(msg, vector=b"")
        return msg, msg._digest(), True

    def keep(self, data: bytes, msg: Message, digest: bytes) -> None:
        kept = replace(msg, body=_copy(msg.body))  # not the body the first reader holds
        with self._lock:
            self._seen[data] = (kept, digest)
            if len(self._seen) > self._limit:
                self._seen.popitem(last=False)


@dataclass(frozen=True)
class Binding:
    """The session one message belongs to: one secure sum of one field in one epoch of one
    run. `run` is the run id both sides know in a flame run (the aggregator's, the one the
    node's kick-off named): a run started over under a new id re-runs its epochs with fresh
    keys, and nothing signed in one run is then taken in another. "" = no run (the protocol
    used on its own), which leaves the header and context as they were."""

    analysis: str
    epoch: int
    field: str
    run: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.analysis, str) or not isinstance(self.field, str):
            raise ProtocolViolation("binding: analysis and field must be strings")
        if not isinstance(self.epoch, int) or isinstance(self.epoch, bool) or self.epoch < 0:
            raise ProtocolViolation("binding: epoch must be a non-negative int")
        if not isinstance(self.run, str):
            raise ProtocolViolation("binding: run must be a string")

    def context(self) -> bytes:
        """Unambiguous bytes of the binding (for key derivation and AEAD data)."""
        parts: list[object] = [self.analysis, self.epoch, self.field]
        if self.run:
            parts.append(self.run)
        return json.dumps(parts, separators=(",", ":")).encode()


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode()


def b64d(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise ProtocolViolation(f"{what}: expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolViolation(f"{what}: not valid base64") from None


@dataclass(frozen=True)
class Message:
    """One protocol message. `body` holds JSON values only; `vector` raw masked words (any
    bytes-like: a node's masked input or a read message's slice, neither copied)."""

    binding: Binding
    round: str
    sender: str
    body: Mapping[str, Any]
    vector: bytes | memoryview = b""
    signature: bytes = b""

    def header(self) -> bytes:
        head = {
            "analysis": self.binding.analysis,
            "epoch": self.binding.epoch,
            "field": self.binding.field,
            "round": self.round,
            "sender": self.sender,
            "body": self.body,
        }
        if self.binding.run:
            head["run"] = self.binding.run
        return json.dumps(head, sort_keys=True, separators=(",", ":")).encode()

    def _digest(self) -> bytes:
        return (
            _CONTEXT + hashlib.sha256(self.header()).digest() + hashlib.sha256(self.vector).digest()
        )

    def signed(self, key: Ed25519PrivateKey | None) -> Message:
        """This message signed with `key` (unchanged, unsigned, without one)."""
        if key is None:
            return self
        return replace(self, signature=key.sign(self._digest()))

    def verify(self, key: Ed25519PublicKey) -> None:
        self._verify(key, self._digest())

    def _verify(self, key: Ed25519PublicKey, digest: bytes) -> None:
        """`digest` is this message's own (`_digest`, or kept with its cached parse)."""
        seen = hashlib.sha256(key.public_bytes_raw() + digest + self.signature).digest()
        if _VERIFIED.has(seen):
            return
        try:
            key.verify(self.signature, digest)
        except InvalidSignature:
            raise ProtocolViolation(
                f"{self.round!r} message claiming to be from {self.sender!r}: bad signature"
            ) from None
        _VERIFIED.add(seen)

    def to_bytes(self) -> bytes:
        header = self.header()
        return b"".join(
            [
                _HEAD.pack(MAGIC, VERSION, len(header)),
                header,
                _VECTOR_LEN.pack(len(self.vector)),
                self.vector,
                bytes([len(self.signature)]),
                self.signature,
            ]
        )

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> Message:
        """Parse (not verify) a message; ProtocolViolation saying what is malformed."""
        size = memoryview(data).nbytes
        if size > max_bytes:
            raise ProtocolViolation(f"masking message of {size} bytes is over the limit")
        if not isinstance(data, bytes):  # the vector stays a view of `data`: never mutable
            data = bytes(data)
        view = memoryview(data)
        if view.nbytes < _HEAD.size:
            raise ProtocolViolation("masking message is too short")
        magic, version, header_len = _HEAD.unpack_from(view)
        if magic != MAGIC or version != VERSION:
            raise ProtocolViolation("not a masking message of version 1")
        pos = _HEAD.size + header_len
        if view.nbytes < pos + _VECTOR_LEN.size:
            raise ProtocolViolation("masking message is truncated (header)")
        try:
            head = json.loads(bytes(view[_HEAD.size : pos]))
        except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: JSON, digits
            raise ProtocolViolation("masking message header is not JSON") from None
        if _depth(head) > _MAX_DEPTH:
            raise ProtocolViolation(f"masking message header nests deeper than {_MAX_DEPTH}")
        (vector_len,) = _VECTOR_LEN.unpack_from(view, pos)
        pos += _VECTOR_LEN.size
        if view.nbytes < pos + vector_len + 1:
            raise ProtocolViolation("masking message is truncated (vector)")
        vector = view[pos : pos + vector_len]  # a view: `data` is not copied again
        pos += vector_len
        sig_len = view[pos]
        signature = bytes(view[pos + 1 :])
        if len(signature) != sig_len:
            raise ProtocolViolation("masking message has a malformed signature field")
        if not isinstance(head, dict) or set(head) - {"run"} != _HEADER_FIELDS:
            raise ProtocolViolation("masking message header has the wrong fields")
        run = head.get("run", "")
        if "run" in head and (not isinstance(run, str) or not run):
            raise ProtocolViolation("masking message header names no valid run")
        if head["round"] not in ROUNDS or not isinstance(head["sender"], str):
            raise ProtocolViolation("masking message names an unknown round or no sender")
        if not isinstance(head["body"], dict):
            raise ProtocolViolation("masking message body is not an object")
        binding = Binding(head["analysis"], head["epoch"], head["field"], run)
        return cls(binding, head["round"], head["sender"], head["body"], vector, signature)


def open_message(
    message: Message | bytes,
    *,
    binding: Binding,
    round: str,
    keys: Mapping[str, Ed25519PublicKey] | None,
    senders: frozenset[str] | set[str] | None = None,
    carrier: str | None = None,
    unsigned: bool = False,
) -> Message:
    """`message` checked: this session's binding, this round, an allowed sender and (when
    `keys` is given: signed mode) that sender's valid signature. `carrier` is the sender the
    transport authenticated (its signed envelope): the message must then name it. With
    `unsigned` (a point-to-point round in carrier-authenticated mode, which needs `carrier`)
    the message must carry no signature: the envelope's covers it. Raises
    ProtocolViolation naming the round and the claimed sender."""
    if unsigned and keys is not None:
        raise ProtocolViolation(f"a {round!r} message cannot be both unsigned and signed")
    digest, keep = None, False
    if isinstance(message, Message):
        msg = message
    else:
        msg, digest, keep = _PARSED.parse(message)
    if unsigned and carrier is None:
        raise ProtocolViolation(
            f"{msg.round!r} message from {msg.sender!r} without the sender its carrier "
            "authenticated, which this unsigned round needs: refused"
        )
    if msg.binding != binding:
        raise ProtocolViolation(
            f"{msg.round!r} message from {msg.sender!r} belongs to another session "
            "(analysis, epoch, field or run differ): replayed or relabelled"
        )
    if msg.round != round:
        raise ProtocolViolation(
            f"a {msg.round!r} message from {msg.sender!r} where a {round!r} message was expected"
        )
    if carrier is not None and msg.sender != carrier:
        raise ProtocolViolation(
            f"{round!r} message in the name of {msg.sender!r} arrived from {carrier!r}: refused"
        )
    if senders is not None and msg.sender not in senders:
        raise ProtocolViolation(f"{round!r} message from {msg.sender!r}, who may not send it")
    if unsigned and msg.signature:
        raise ProtocolViolation(
            f"{round!r} message from {msg.sender!r} is signed, but this round travels "
            "unsigned (its carrier authenticates it): refused"
        )
    if keys is not None:
        key = keys.get(msg.sender)
        if key is None:
            raise ProtocolViolation(f"{round!r} message from {msg.sender!r}: no known identity")
        if not msg.signature:
            raise ProtocolViolation(
                f"{round!r} message from {msg.sender!r} is unsigned, but this round must "
                "carry its sender's signature: refused"
            )
        msg._verify(key, msg._digest() if digest is None else digest)
    if keep and digest is not None and isinstance(message, bytes):
        _PARSED.keep(message, msg, digest)  # every check passed: later readers reuse the parse
    return msg


_PARSED = _Parsed(1 << 11)

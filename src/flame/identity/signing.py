"""Signed envelopes and statuses: every message says, verifiably, which roster member sent it.

Wire form of a signed message (what travels on an inbox, is chunked, or is claim-checked):

    b"FLS" | u8 version (1) | u8 len(signer) | signer id | 64-byte Ed25519 signature | frame

`frame` is the ordinary flame frame (`flame.wire.envelope`: version, id, analysis, sender,
recipient, kind, epoch, sent, category, body and every blob). The signature is over
`b"flame-envelope-v1\\0" + SHA-256(frame)`, so it covers the whole envelope, and a chunked or
claim-checked payload is covered by that digest, checked after reassembly or fetch. Receivers
verify before decoding the frame (`Authenticator.open`): unknown signer, bad signature, a
sender field that is not the signer, or a kind the signer's role may not send -> dropped,
counted, WARNING with the claimed sender.

Chunked messages (`flame.wire.chunks`, version 2) also carry a signature of their
manifest (transfer id, count, piece, total, SHA-256 of the whole) over
`b"flame-chunk-v1\\0" + analysis + b"\\0" + recipient + b"\\0" + manifest`, checked on a
transfer's first chunk before any buffer is allocated: reassembly comes before the envelope
can be verified, and an unauthenticated sender must not make a node buffer anything.

Statuses (retained JSON) carry `"sig": "<base64>"` over `b"flame-status-v1\\0" + analysis +
b"\\0" + node + b"\\0" + the status without "sig" as canonical JSON` (sorted keys, no spaces).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cryptography.exceptions import InvalidSignature

from flame.errors import MessageError
from flame.identity.keys import Identity
from flame.identity.roster import Roster
from flame.wire.envelope import (
    DEFAULT_MAX_BYTES,
    MAGIC,
    Envelope,
    decode,
    encode_parts,
    to_jsonable,
)

__all__ = [
    "SIGNED_MAGIC",
    "Authenticator",
    "SignatureError",
    "SignedFrame",
    "open_signed",
    "sign_parts",
    "status_signature",
    "verify_envelope",
]

log = logging.getLogger(__name__)

SIGNED_MAGIC = b"FLS"
SIGNED_VERSION = 1
_PREFIX = struct.Struct(">3sBB")
_SIGNATURE_BYTES = 64
_ENVELOPE_CONTEXT = b"flame-envelope-v1\0"
_STATUS_CONTEXT = b"flame-status-v1\0"
_CHUNK_CONTEXT = b"flame-chunk-v1\0"

# Which roster role may send which envelope kind (kinds not listed: any member).
_ROLE_OF_KIND = {
    "start": "aggregation",
    "aggregate": "aggregation",
    "finished": "aggregation",
    "abort": "aggregation",
    "result": "analysis",
}

Buffer = bytes | bytearray | memoryview


class SignatureError(MessageError):
    """A message whose signature is missing, foreign or wrong; it is dropped, never acted on.

    `claimed` is the sender the message claims to be from (for the log line)."""

    def __init__(self, reason: str, claimed: str = "?") -> None:
        super().__init__(reason)
        self.claimed = claimed


@dataclass(frozen=True)
class SignedFrame:
    """The verified parts of a signed message: who signed, and the flame frame inside."""

    signer: str
    frame: memoryview


def _digest(parts: Sequence[Buffer]) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.digest()


def sign_parts(identity: Identity, parts: Sequence[Buffer]) -> list[Buffer]:
    """The signed message as buffers (`parts` is `encode_parts(envelope)`; nothing is joined)."""
    signer = identity.node_id.encode()
    signature = identity.sign(_ENVELOPE_CONTEXT + _digest(parts))
    head = _PREFIX.pack(SIGNED_MAGIC, SIGNED_VERSION, len(signer)) + signer + signature
    return [head, *parts]


def _claimed_sender(view: memoryview) -> str:
    """Who an unsigned flame frame says it is from (for the log line), or '?'."""
    try:
        return decode(view).sender
    except MessageError:
        return "?"


def open_signed(data: Buffer, roster: Roster) -> SignedFrame:
    """Check a signed message against the roster; raise SignatureError saying why not."""
    view = memoryview(data).cast("B")
    magic = bytes(view[:3])
    if magic == MAGIC:
        raise SignatureError("unsigned message (no signature)", _claimed_sender(view))
    if view.nbytes < _PREFIX.size or magic != SIGNED_MAGIC:
        raise MessageError(f"malformed: not a flame message ({view.nbytes} bytes, bad magic)")
    _, version, length = _PREFIX.unpack_from(view)
    start = _PREFIX.size + length + _SIGNATURE_BYTES
    if version != SIGNED_VERSION or view.nbytes < start:
        raise SignatureError(f"signed message of version {version} / {view.nbytes} bytes")
    try:
        signer = bytes(view[_PREFIX.size : _PREFIX.size + length]).decode()
    except UnicodeDecodeError:
        raise SignatureError("signer id is not UTF-8") from None
    member = roster.get(signer)
    if member is None:
        raise SignatureError("signer is not in the roster (foreign signature)", signer)
    signature = bytes(view[_PREFIX.size + length : start])
    frame = view[start:]
    try:
        member.public_key.verify(signature, _ENVELOPE_CONTEXT + hashlib.sha256(frame).digest())
    except InvalidSignature:
        raise SignatureError("bad signature", signer) from None
    return SignedFrame(signer, frame)


def verify_envelope(
    data: Buffer,
    roster: Roster,
    *,
    sender: str | None = None,
    kind: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Envelope:
    """A signed message (e.g. a result the aggregator forwarded as `envelope.signed`) checked
    against the roster and decoded. For third parties: a decrypter verifies each contributor's
    own signature on its ciphertexts this way. `sender` / `kind` pin what it must be.
    Raises SignatureError (or MessageError for a malformed frame)."""
    opened = open_signed(data, roster)
    envelope = decode(opened.frame, max_bytes=max_bytes)
    _check_envelope(envelope, opened.signer, roster)
    if sender is not None and envelope.sender != sender:
        raise SignatureError(f"signed by {envelope.sender!r}, expected {sender!r}", opened.signer)
    if kind is not None and envelope.kind != kind:
        raise SignatureError(f"a {envelope.kind!r} message, expected {kind!r}", opened.signer)
    return replace(envelope, signed=data)


def _check_envelope(envelope: Envelope, signer: str, roster: Roster) -> None:
    if envelope.sender != signer:
        raise SignatureError(
            f"says it is from {envelope.sender!r} but is signed by {signer!r}", envelope.sender
        )
    wanted = _ROLE_OF_KIND.get(envelope.kind)
    member = roster.get(signer)
    if wanted is not None and (member is None or member.role != wanted):
        role = member.role if member is not None else "none"
        raise SignatureError(
            f"a {envelope.kind!r} message from a member of role {role!r} (only {wanted})",
            signer,
        )


def _canonical(status: dict[str, Any]) -> bytes:
    body = {k: v for k, v in status.items() if k != "sig"}
    return json.dumps(to_jsonable(body), sort_keys=True, separators=(",", ":")).encode()


def status_signature(identity: Identity, analysis_id: str, status: dict[str, Any]) -> str:
    """The base64 signature for a status of `identity`'s node in `analysis_id`."""
    message = _status_message(analysis_id, identity.node_id, status)
    return base64.b64encode(identity.sign(message)).decode()


def _status_message(analysis_id: str, node: str, status: dict[str, Any]) -> bytes:
    return _STATUS_CONTEXT + f"{analysis_id}\0{node}\0".encode() + _canonical(status)


class Authenticator:
    """One node's signing identity and the roster it verifies everyone against.

    The transports use it on every message: `seal` before sending, `open` on receipt (before
    anything else), `sign_status` / `verify_status` for the retained statuses. `rejected`
    counts what was dropped for a signature reason.
    """

    def __init__(self, identity: Identity, roster: Roster) -> None:
        member = roster.get(identity.node_id)
        if member is None:
            raise MessageError(f"node {identity.node_id!r} is not in the roster")
        if member.public_text != identity.public_text:
            raise MessageError(
                f"the identity key of {identity.node_id!r} does not match its roster entry "
                f"({roster.source}); wrong FLAME_IDENTITY__KEY_FILE or an outdated roster"
            )
        self.identity = identity
        self.roster = roster
        self.rejected = 0

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def seal(self, parts: Sequence[Buffer]) -> list[Buffer]:
        return sign_parts(self.identity, parts)

    def seal_envelope(self, envelope: Envelope) -> list[Buffer]:
        if envelope.sender != self.node_id:
            raise MessageError(f"{self.node_id} cannot sign a message from {envelope.sender!r}")
        return self.seal(encode_parts(envelope))

    def open(self, data: Buffer, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Envelope:
        """Verify, then decode: the Envelope (with `.signed` = the message), or raise.

        A SignatureError is counted and logged here (WARNING, claimed sender); the caller drops
        the message. MessageError from decoding passes through for the caller to log."""
        try:
            opened = open_signed(data, self.roster)
            envelope = decode(opened.frame, max_bytes=max_bytes)
            _check_envelope(envelope, opened.signer, self.roster)
        except SignatureError as exc:
            self.reject(exc.claimed, str(exc))
            raise
        return replace(envelope, signed=data)

    def chunk_signer(
        self, analysis_id: str, recipient: str
    ) -> Callable[[bytes], tuple[str, bytes]]:
        """Signs chunk manifests of messages to `recipient` (see `flame.wire.chunks`)."""
        context = _CHUNK_CONTEXT + f"{analysis_id}\0{recipient}\0".encode()
        identity = self.identity

        def sign(manifest: bytes) -> tuple[str, bytes]:
            return identity.node_id, identity.sign(context + manifest)

        return sign

    def chunk_check(
        self, analysis_id: str, recipient: str | None = None, *, role: str | None = None
    ) -> Callable[[str, bytes, bytes], str | None]:
        """Checks chunk manifests sent to `recipient` (default: this node), signed by a
        member of `role` if given: why one is refused, or None. The recipient is in what is
        signed, so chunks signed for one node never pass as a broadcast (EVERYONE) or back."""
        context = _CHUNK_CONTEXT + f"{analysis_id}\0{recipient or self.node_id}\0".encode()
        roster = self.roster

        def check(signer: str, manifest: bytes, signature: bytes) -> str | None:
            member = roster.get(signer)
            if member is None:
                return "signer is not in the roster"
            if role is not None and member.role != role:
                return f"signer is of role {member.role!r}, not {role!r}"
            try:
                member.public_key.verify(signature, context + manifest)
            except InvalidSignature:
                return "bad signature"
            return None

        return check

    def reject(self, claimed: str, reason: str) -> None:
        self.rejected += 1
        log.warning(
            "%s dropped a message claiming to be from %r: %s", self.node_id, claimed[:128], reason
        )

    def sign_status(self, analysis_id: str, status: dict[str, Any]) -> dict[str, Any]:
        body = {k: v for k, v in status.items() if k != "sig"}
        return {**body, "sig": status_signature(self.identity, analysis_id, body)}

    def verify_status(self, analysis_id: str, node: str, status: dict[str, Any]) -> bool:
        """Whether `status` (as parsed from the wire, with "sig") is signed by `node`."""
        if not status_signed_by(self.roster, analysis_id, node, status):
            self.reject(node, "status without a valid signature")
            return False
        return True


def status_signed_by(roster: Roster, analysis_id: str, node: str, status: dict[str, Any]) -> bool:
    """Whether the roster member `node` signed this status (no logging: for `flame status`)."""
    member = roster.get(node)
    text = status.get("sig")
    if member is None or not isinstance(text, str):
        return False
    try:
        signature = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    try:
        member.public_key.verify(signature, _status_message(analysis_id, node, status))
    except InvalidSignature:
        return False
    return True


def unwrap_unverified(data: Buffer) -> memoryview:
    """The frame inside a signed message, NOT verified: only for runs without a roster."""
    view = memoryview(data).cast("B")
    if view.nbytes < _PREFIX.size:
        raise MessageError("signed message is too short")
    _, _, length = _PREFIX.unpack_from(view)
    start = _PREFIX.size + length + _SIGNATURE_BYTES
    if view.nbytes < start:
        raise MessageError("signed message is too short")
    return view[start:]

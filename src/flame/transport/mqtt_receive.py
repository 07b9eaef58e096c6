"""Receiving over the broker (`MqttTransport`'s part): what arrives, checked and decoded.

Frames on an inbox or the broadcast topic are one of three kinds, told apart by their first
three bytes: a flame frame (`FLM`, see `flame.wire.envelope`), a chunk of a larger frame (`FLC`;
a broadcast's chunks are reassembled apart, their manifest signed for EVERYONE by the
aggregator) or a claim-check reference (`FLR`, see `flame.wire.chunks.ClaimCheck`). paho's
network thread only queues what arrives; decoding, reassembly and verification happen in
`receive()`, on the caller's thread, and every frame that fails any check is logged once and
dropped. Statuses of watched nodes arrive as envelopes of kind `status`
(`Transport.status_envelope`).

Why a module of its own: this is where a hostile frame meets the node, so it reads as one.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from flame.errors import MessageError, TransportError
from flame.identity.signing import SIGNED_MAGIC, SignatureError
from flame.transport.base import Transport
from flame.transport.topics import VALID_NAME, status_topic
from flame.utils.deadline import Deadline
from flame.wire.chunks import (
    CHUNK_HEADER_SIZE,
    CHUNK_MAGIC,
    REFERENCE_MAGIC,
    ClaimCheck,
    Reassembler,
    decode_reference,
)
from flame.wire.envelope import BROADCAST_KINDS, EVERYONE, MAGIC, Envelope

if TYPE_CHECKING:
    from flame.clients.message_broker_client import IncomingMessage, MessageBrokerClient
    from flame.config import BrokerSettings

__all__ = ["MqttReceiving"]

log = logging.getLogger(__name__)

_MAX_CHUNK_HEADER = CHUNK_HEADER_SIZE + 1 + 255 + 64  # a signed chunk's longest header


class MqttReceiving(Transport):
    """Mixin of `MqttTransport`: receive, and what is dropped on the way."""

    settings: BrokerSettings
    _client: MessageBrokerClient | None
    _inbox: str
    _broadcast: str
    _subscribed_broadcasts: bool
    _heard_broadcast: bool
    _reassembler: Reassembler
    _broadcast_reassembler: Reassembler
    _watching: set[str] | None
    _claim_check: ClaimCheck | None
    dropped: int

    if TYPE_CHECKING:

        def _check_conflict(self) -> None: ...

        def _own_status(self, message: IncomingMessage) -> None: ...

    def receive(self, timeout: float) -> Envelope | None:
        if self._client is None:
            raise TransportError(f"{self.node_id} is not connected")
        client = self._client
        deadline = Deadline(timeout)
        while True:
            self._check_conflict()
            for reassembler in (self._reassembler, self._broadcast_reassembler):
                for dropped in reassembler.expire():
                    self._drop(f"an incomplete {dropped}")
            message = client.get(deadline.left())
            if message is None:
                return None
            try:
                envelope = self._handle(message)
            except Exception as exc:  # never let a hostile frame take the node down
                log.exception("%s failed on a message on %s", self.node_id, message.topic)
                self._drop(f"a message that raised {type(exc).__name__}")
                envelope = None
            finally:
                client.ack(message)
            if envelope is not None:
                return envelope

    # --- receiving ----------------------------------------------------------------------------

    def _drop(self, what: str) -> None:
        self.dropped += 1
        log.warning("%s dropped %s", self.node_id, what)

    def _handle(self, message: IncomingMessage) -> Envelope | None:
        if message.topic == self._inbox:
            return self._handle_frame(message.payload)
        if message.topic == self._broadcast:
            if not self._subscribed_broadcasts:  # a subscription left in the session by an earlier
                return None  # process; this one's policy may decline the aggregates
            return self._handle_frame(message.payload, broadcast=True)
        if message.topic == status_topic(self.analysis_id, self.node_id):
            self._own_status(message)
            return None
        parts = message.topic.split("/")
        if (
            len(parts) == 4
            and parts[0] == "flame"
            and parts[1] == self.analysis_id
            and parts[3] == "status"
        ):
            return self._handle_status(parts[2], message.payload)
        self._drop(f"a message on unexpected topic {message.topic[:200]!r}")
        return None

    def _handle_status(self, node: str, payload: bytes | bytearray) -> Envelope | None:
        if node == self.node_id or not payload:
            return None  # our own status, or a cleared retained message
        if not VALID_NAME.match(node):
            self._drop(f"a status from invalid node id {node[:40]!r}")
            return None
        if self._watching is not None and node not in self._watching:
            return None
        envelope = self.status_envelope(node, payload)
        if envelope is None:
            self.dropped += 1
        return envelope

    def _handle_frame(self, payload: bytes | bytearray, broadcast: bool = False) -> Envelope | None:
        limit = self.settings.max_message_bytes
        magic = payload[:3]
        frame: bytes | bytearray
        try:
            if magic == CHUNK_MAGIC:
                if len(payload) > limit + _MAX_CHUNK_HEADER:
                    raise MessageError(f"chunk of {len(payload)} bytes is over the limit")
                # A broadcast's chunks go to a reassembler of their own, whose manifests must
                # be signed for EVERYONE by the aggregator (signed runs).
                chunks = self._broadcast_reassembler if broadcast else self._reassembler
                whole = chunks.add(payload)
                if whole is None:
                    return None
                frame = whole
            elif magic == REFERENCE_MAGIC:
                frame = self._fetch_claim_check(payload)
            elif magic in (MAGIC, SIGNED_MAGIC):
                frame = payload
            else:
                raise MessageError(f"not a flame frame ({len(payload)} bytes, bad magic)")
            envelope = self.incoming(frame, max_bytes=limit)
        except SignatureError:
            self.dropped += 1  # logged (WARNING, claimed sender) and counted by the authenticator
            return None
        except MessageError as exc:
            self._drop(f"a malformed message: {exc}")
            return None
        self.bytes_received += len(frame)
        recipient = EVERYONE if broadcast else self.node_id
        if envelope.analysis != self.analysis_id or envelope.recipient != recipient:
            self._drop(f"a message addressed to {envelope.analysis}/{envelope.recipient}")
            return None
        if broadcast and envelope.kind not in BROADCAST_KINDS:  # decode refuses it already
            self._drop(f"a {envelope.kind!r} message on the broadcast topic")
            return None
        if broadcast and not self._heard_broadcast:
            # Only now is it known that the broker lets broadcasts through to this node
            # (Mosquitto grants a subscription its ACL will never deliver on): from here on
            # the statuses say so, and the aggregator stops sending this node its own copy.
            self._heard_broadcast = True  # (the next status carries it)
        return envelope

    def _fetch_claim_check(self, payload: bytes | bytearray) -> bytearray:
        reference = decode_reference(payload)
        if self._claim_check is None:
            raise MessageError("a claim-check reference arrived but no claim check is set up")
        if reference.size > self.settings.max_message_bytes:
            raise MessageError(f"claim-checked frame of {reference.size} bytes is over the limit")
        try:
            frame = self._claim_check.fetch(reference.reference, reference.size)
        except Exception as exc:  # storage is pluggable; a failed fetch drops the message
            raise MessageError(
                f"claim check could not fetch the frame ({type(exc).__name__}: {exc})"
            ) from None
        if len(frame) != reference.size or hashlib.sha256(frame).digest() != reference.sha256:
            raise MessageError("claim-checked frame fails its size or SHA-256 check")
        return frame

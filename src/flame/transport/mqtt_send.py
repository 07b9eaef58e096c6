"""Sending envelopes over the broker (`MqttTransport`'s part).

Why a module of its own: how a frame travels depends on its size, and that is its own job. A
small frame is one QoS 1 publish (many at once for `dispatch`); a frame over `chunk_size` goes
as chunks with a window in flight; with a claim check, a large frame goes to storage and the
message carries its key. A `broadcast` does the same once, on the broadcast topic, signed for
EVERYONE (its chunk manifest too), whatever its size.
Every wait for a PUBACK is the send timeout plus the frame's size at `min_send_rate`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from flame.errors import NotAcknowledged, TransportError
from flame.transport.base import Delivery, Transport
from flame.transport.topics import VALID_NAME, inbox_topic
from flame.wire.chunks import (
    Buffer,
    ClaimCheck,
    chunk_header_size,
    encode_reference,
    frame_digest,
    frame_size,
    split_frame,
)
from flame.wire.envelope import EVERYONE, Envelope

if TYPE_CHECKING:
    from flame.clients.message_broker_client import MessageBrokerClient, PendingPublish
    from flame.config import BrokerSettings

__all__ = ["MqttSending", "wrap_send_error"]

log = logging.getLogger(__name__)


def wrap_send_error(exc: TransportError, prefix: str) -> TransportError:
    """`exc` behind `prefix`, keeping its kind: a `NotAcknowledged` stays one (and names the
    settings that made the wait), so a caller with a deadline of its own can keep trying."""
    if isinstance(exc, NotAcknowledged):
        return NotAcknowledged(
            f"{prefix}: {exc} (the wait per message is FLAME_BROKER__SEND_TIMEOUT plus its "
            "size at FLAME_BROKER__MIN_SEND_RATE bytes/s)"
        )
    return TransportError(f"{prefix}: {exc}")


class MqttSending(Transport):
    """Mixin of `MqttTransport`: send, dispatch, broadcast and post envelopes."""

    settings: BrokerSettings
    _connected: bool
    _claim_check: ClaimCheck | None
    _claim_check_threshold: int
    _send_window: int
    _broadcast: str

    if TYPE_CHECKING:

        @property
        def client(self) -> MessageBrokerClient: ...

        def _check_conflict(self) -> None: ...

    def _check_sendable(self, envelope: Envelope) -> None:
        """TransportError unless this node can send `envelope` now, to a node of its run."""
        recipient = envelope.recipient
        self._check_conflict()
        if not self._connected:
            raise TransportError(f"cannot send to {recipient!r}: {self.node_id} is not connected")
        if not VALID_NAME.match(recipient) or envelope.analysis != self.analysis_id:
            raise TransportError(
                f"cannot send to {recipient!r} in analysis {envelope.analysis!r}: "
                "not a node of this analysis"
            )

    def send(self, envelope: Envelope, timeout: float | None = None) -> None:
        recipient = envelope.recipient
        self._check_sendable(envelope)
        parts = self.outgoing(envelope)
        size = frame_size(parts)
        limit = self.settings.max_message_bytes
        if size > limit:
            raise TransportError(
                f"message to {recipient!r} is {size} bytes, over the broker limit of {limit}"
            )
        wait = timeout if timeout is not None else self.settings.send_timeout
        topic = inbox_topic(self.analysis_id, recipient)
        self.bytes_sent += size
        try:
            if self._claim_check is not None and size > self._claim_check_threshold:
                self._send_claim_check(topic, parts, size, wait)
            elif size <= self.settings.chunk_size:
                self.client.publish(topic, b"".join(parts), timeout=self.patience(size, wait))
            else:
                self._send_chunks(topic, recipient, parts, wait)
        except TransportError as exc:
            raise wrap_send_error(exc, f"cannot send to {recipient!r}") from None

    def patience(self, size: int, timeout: float | None = None) -> float:
        """How long a message of `size` bytes may wait for its PUBACK: the send timeout plus
        its transfer at the slowest rate a link is assumed to carry (`min_send_rate`)."""
        base = self.settings.send_timeout if timeout is None else timeout
        return base + size / self.settings.min_send_rate

    def dispatch(self, envelopes: Sequence[Envelope], timeout: float | None = None) -> Delivery:
        """Publish every small envelope at once; their PUBACKs are confirmed through the
        Delivery (`send_all`: awaited together, one broker round trip for a broadcast to n
        nodes, not n in a row). Large ones (chunks, claim check) go one by one through `send`
        before this returns."""
        wait = timeout if timeout is not None else self.settings.send_timeout
        pending: list[tuple[str, PendingPublish]] = []
        total = 0
        try:
            for envelope in envelopes:
                recipient = envelope.recipient
                self._check_sendable(envelope)
                parts = self.outgoing(envelope)
                size = frame_size(parts)
                checked = self._claim_check is not None and size > self._claim_check_threshold
                if checked or size > self.settings.chunk_size:
                    self.send(envelope, timeout)  # its own waits: progress, not the total
                    continue
                topic = inbox_topic(self.analysis_id, recipient)
                try:
                    pending.append((recipient, self.client.publish_nowait(topic, b"".join(parts))))
                except TransportError as exc:
                    raise TransportError(f"cannot send to {recipient!r}: {exc}") from None
                self.bytes_sent += size
                total += size
        except BaseException:
            Delivery(pending).abandon()
            raise
        return Delivery(pending, self.patience(total, wait))

    def broadcast(
        self, envelope: Envelope, recipients: Sequence[str], timeout: float | None = None
    ) -> Delivery:
        """Once on the broadcast topic, whatever its size: one frame, chunks whose manifest
        is signed for EVERYONE, or one stored copy and its reference (claim check). Chunks
        and the claim check are confirmed before this returns, as in `dispatch`."""
        if len(recipients) < 2 or not self._connected:
            return super().broadcast(envelope, recipients, timeout)
        self._check_conflict()
        parts = self.outgoing(replace(envelope, recipient=EVERYONE))
        size = frame_size(parts)
        limit = self.settings.max_message_bytes
        who = f"{len(recipients)} nodes"
        if size > limit:
            raise TransportError(
                f"broadcast to {who} is {size} bytes, over the broker limit of {limit}"
            )
        wait = timeout if timeout is not None else self.settings.send_timeout
        self.bytes_sent += size
        try:
            if self._claim_check is not None and size > self._claim_check_threshold:
                self._send_claim_check(self._broadcast, parts, size, wait)
            elif size > self.settings.chunk_size:
                self._send_chunks(self._broadcast, EVERYONE, parts, wait)
            else:
                pending = self.client.publish_nowait(self._broadcast, b"".join(parts))
                return Delivery([(f"{who} (broadcast)", pending)], self.patience(size, wait))
        except TransportError as exc:
            raise wrap_send_error(exc, f"cannot broadcast to {who}") from None
        return Delivery()

    def probe_broadcast(self, envelope: Envelope) -> None:
        """Only a probe that fits one frame goes (the aggregator's carries no aggregate)."""
        frame = self._broadcast_frame(envelope) if self._connected else None
        if frame is None:
            return
        try:  # unconfirmed: a refusal (an ACL without the topic) only means no broadcasts
            self.client.publish_nowait(self._broadcast, frame).abandon()
        except TransportError as exc:
            log.warning("%s cannot use the broadcast topic: %s", self.node_id, exc)

    def _broadcast_frame(self, envelope: Envelope) -> bytes | None:
        """`envelope` to EVERYONE as one signed frame; None if it needs chunks or storage."""
        parts = self.outgoing(replace(envelope, recipient=EVERYONE))
        size = frame_size(parts)
        checked = self._claim_check is not None and size > self._claim_check_threshold
        return None if checked or size > self.settings.chunk_size else b"".join(parts)

    def post(self, envelope: Envelope) -> None:
        self._check_conflict()
        parts = self.outgoing(envelope)
        size = frame_size(parts)
        if not self._connected or size > self.settings.chunk_size or self._claim_check is not None:
            self.send(envelope)
            return
        self.bytes_sent += size
        topic = inbox_topic(self.analysis_id, envelope.recipient)
        try:
            self.client.publish_nowait(topic, b"".join(parts)).abandon()
        except TransportError as exc:
            raise TransportError(f"cannot send to {envelope.recipient!r}: {exc}") from None

    def _send_chunks(
        self, topic: str, recipient: str, parts: Sequence[Buffer], timeout: float
    ) -> None:
        """A window of chunks in flight: memory stays `send_window` chunks, throughput high.

        `timeout` bounds each wait for a broker acknowledgement (progress), not the whole
        transfer, so a large frame over a slow link is not cut off while it is moving. A signed
        node signs the chunk manifest (once per message), so receivers buffer nothing forged.
        """
        auth = self.auth
        sign = None if auth is None else auth.chunk_signer(self.analysis_id, recipient)
        header = chunk_header_size(None if auth is None else self.node_id)
        piece = max(self.settings.chunk_size - header, 1)
        window: deque[PendingPublish] = deque()
        try:
            wait = self.patience(self.settings.chunk_size, timeout)
            for chunk in split_frame(parts, piece, sign=sign):
                if len(window) >= self._send_window:
                    window.popleft().wait(wait)
                window.append(self.client.publish_nowait(topic, chunk))
            while window:
                window.popleft().wait(wait)
        finally:
            for pending in window:
                pending.abandon()

    def _send_claim_check(
        self, topic: str, parts: Sequence[Buffer], size: int, timeout: float
    ) -> None:
        assert self._claim_check is not None
        digest = frame_digest(parts)
        try:
            reference = self._claim_check.put(parts, size, digest)
        except Exception as exc:  # storage is pluggable; its errors become transport errors
            raise TransportError(
                f"claim check could not store {size} bytes ({type(exc).__name__}: {exc})"
            ) from None
        frame = encode_reference(reference, size, digest)
        self.client.publish(topic, frame, timeout=self.patience(len(frame), timeout))

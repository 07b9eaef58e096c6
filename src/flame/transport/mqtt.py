"""The transport over a real MQTT broker; behaves like `MemoryTransport`, across processes.

Topics (DESIGN.md): `flame/{analysis}/{node}/inbox` (QoS 1; a node subscribes to its own inbox
only, so broker ACLs can enforce that nobody reads another's mail) and
`flame/{analysis}/{node}/status` (retained; the last will sets `{"state": "offline"}`).

Frames on an inbox are one of three kinds, told apart by their first three bytes: a flame
frame (`FLM`, see `flame.wire.envelope`), a chunk of a larger frame (`FLC`) or a claim-check
reference (`FLR`, see `_chunks.ClaimCheck`). paho's network thread only queues what arrives;
decoding, reassembly and verification happen in `receive()`, on the caller's thread, and
every frame that fails any check is logged once and dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from flame.clients.message_broker_client import (
    IncomingMessage,
    MessageBrokerClient,
    PasswordSource,
    PendingPublish,
    ProtocolName,
    Will,
)
from flame.errors import MessageError, NotAcknowledged, TransportError
from flame.identity.signing import SIGNED_MAGIC, SignatureError
from flame.transport.base import Delivery, Transport
from flame.transport.mqtt_claims import ProcessClaims
from flame.transport.topics import broadcast_topic, client_id_for, inbox_topic, status_topic
from flame.utils.deadline import Deadline
from flame.wire.chunks import (
    CHUNK_HEADER_SIZE,
    CHUNK_MAGIC,
    REFERENCE_MAGIC,
    Buffer,
    ClaimCheck,
    Reassembler,
    chunk_header_size,
    decode_reference,
    encode_reference,
    frame_digest,
    frame_size,
    split_frame,
)
from flame.wire.envelope import EVERYONE, MAGIC, Envelope, to_jsonable

if TYPE_CHECKING:
    from flame.config import BrokerSettings, FlameConfig
    from flame.identity.signing import Authenticator

__all__ = ["ClaimCheck", "MqttTransport", "client_id_for", "inbox_topic", "status_topic"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
FINAL_STATES = ("done", "failed")
MAX_STATUS_BYTES = 64 * 1024
_MAX_CHUNK_HEADER = CHUNK_HEADER_SIZE + 1 + 255 + 64  # a signed chunk's longest header


def wrap_send_error(exc: TransportError, prefix: str) -> TransportError:
    """`exc` behind `prefix`, keeping its kind: a `NotAcknowledged` stays one (and names the
    settings that made the wait), so a caller with a deadline of its own can keep trying."""
    if isinstance(exc, NotAcknowledged):
        return NotAcknowledged(
            f"{prefix}: {exc} (the wait per message is FLAME_BROKER__SEND_TIMEOUT plus its "
            "size at FLAME_BROKER__MIN_SEND_RATE bytes/s)"
        )
    return TransportError(f"{prefix}: {exc}")


def password_from_settings(settings: BrokerSettings) -> PasswordSource | None:
    """The broker token from settings; a token file is re-read when it changes (rotation)."""
    from flame.clients.token import TokenSource

    source = TokenSource(settings, "message broker")
    return source.get if source.configured else None


class MqttTransport(Transport, ProcessClaims):
    """One node's connection to the federation through an MQTT broker."""

    def __init__(
        self,
        settings: BrokerSettings,
        analysis_id: str,
        node_id: str,
        password: PasswordSource | None = None,
        *,
        claim_check: ClaimCheck | None = None,
        claim_check_threshold: int | None = None,
        max_transfers: int = 64,
        max_reassembly_bytes: int | None = None,
        reassembly_timeout: float | None = None,
        send_window: int = 16,
        protocol: ProtocolName | None = None,
        reconnect_delay: tuple[int, int] = (1, 5),
        auth: Authenticator | None = None,
    ) -> None:
        for what, name in (("analysis id", analysis_id), ("node id", node_id)):
            if not _NAME.match(name):
                raise ValueError(f"{what} {name!r} may use only letters, digits, '.', '_', '-'")
        if settings.url is None:
            raise TransportError("the MQTT transport needs a broker URL (FLAME_BROKER__URL)")
        super().__init__(analysis_id, node_id, auth=auth)
        self.settings = settings
        self._password = password if password is not None else password_from_settings(settings)
        self._claim_check = claim_check
        self._claim_check_threshold = (
            claim_check_threshold if claim_check_threshold is not None else settings.chunk_size
        )
        self._send_window = max(1, send_window)
        self._protocol = protocol
        self._reconnect_delay = reconnect_delay
        self._inbox = inbox_topic(analysis_id, node_id)
        self._broadcast = broadcast_topic(analysis_id)
        self._take_broadcasts = False  # asked for (take_broadcasts) ...
        self._subscribed_broadcasts = False  # ... and subscribed ...
        self._heard_broadcast = False  # ... and one arrived: statuses say "broadcast": true
        self._reassembler = Reassembler(
            max_bytes=settings.max_message_bytes,
            timeout=reassembly_timeout
            if reassembly_timeout is not None
            else 2 * settings.send_timeout,
            max_transfers=max_transfers,
            max_total_bytes=max_reassembly_bytes,
        )
        self._watching: set[str] | None = set()
        self._client: MessageBrokerClient | None = None
        self._connected = False
        self._announced = False
        self._status_pending: PendingPublish | None = None
        self._last_status: dict[str, Any] = {}
        self.dropped = 0
        self.conflict: str | None = None  # set when another process took this node's session

    @classmethod
    def from_config(
        cls, config: FlameConfig, password: PasswordSource | None = None, **options: Any
    ) -> MqttTransport:
        """The transport for this node as the config describes it."""
        if config.node_id is None:
            raise TransportError("the MQTT transport needs this node's id (FLAME_NODE_ID)")
        return cls(config.broker, config.analysis_id, config.node_id, password, **options)

    @property
    def client(self) -> MessageBrokerClient:
        if self._client is None:
            raise TransportError(f"{self.node_id} is not connected")
        return self._client

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def link(self) -> int:
        return 0 if self._client is None else self._client.sessions_lost

    def _status_payload(self, status: dict[str, Any]) -> bytes:
        link = self.link
        full = {**status, "link": link} if link else status  # `link` only once it counts
        if self._heard_broadcast and status.get("state") != "offline":
            full = {**full, "broadcast": True}
        return json.dumps(to_jsonable(self.sign_status(full)), separators=(",", ":")).encode()

    def _renew_status(self) -> bytes | None:
        """After every reconnect: the status signed again, with the next `seq` (a will may
        have fired meanwhile, and only a higher `seq` brings a process back: a replay of its
        last status cannot; see status_order) and the `link` count (when the broker lost our
        session, watchers learn that what was queued for us is gone)."""
        return self._status_payload(self._last_status) if self._last_status else None

    def _new_client(
        self, client_id: str, will: Will | None, session_expiry: int | None = None
    ) -> MessageBrokerClient:
        settings = self.settings
        assert settings.url is not None
        username = settings.username
        password = self._password
        if username is None and password is not None:
            username = self.node_id  # brokers key ACLs on the user name; the node id is natural
        return MessageBrokerClient(
            settings.url,
            client_id=client_id,
            username=username,
            password=password,
            ca_file=settings.ca_file,
            cert_file=settings.cert_file,
            key_file=settings.key_file,
            keepalive=settings.keepalive,
            session_expiry=settings.session_expiry if session_expiry is None else session_expiry,
            connect_timeout=settings.connect_timeout,
            will=will,
            protocol=self._protocol,
            reconnect_delay=self._reconnect_delay,
        )

    # --- Transport ----------------------------------------------------------------------------

    def connect(self, status: dict[str, Any]) -> None:
        if self._connected:
            raise TransportError(f"{self.node_id} is already connected")
        settings = self.settings
        assert settings.url is not None
        self.generation = self._next_generation()
        will = Will(
            status_topic(self.analysis_id, self.node_id),
            self._status_payload(self.offline_status()),
            qos=1,
            retain=True,
        )
        client = self._new_client(client_id_for(self.analysis_id, self.node_id), will)
        client.on_reconnect = self._renew_status
        client.on_taken_over = self._on_taken_over
        self.conflict = None
        # Signed: chunk manifests must be signed by a roster member before anything is buffered.
        auth = self.auth
        self._reassembler.check = None if auth is None else auth.chunk_check(self.analysis_id)
        client.connect()
        self._announced = False
        self._status_pending = None
        try:
            client.subscribe([(self._inbox, 1)], timeout=settings.send_timeout)
            self._subscribed_broadcasts = self._subscribe_broadcasts(client)
            # Our own status topic only after a reconnect (the broker's retained copy: who
            # holds this node now?). Subscribed from the start, every status this node
            # announces would come back to it, two needless deliveries per epoch.
            client.refresh_topics = [(status_topic(self.analysis_id, self.node_id), 1)]
            self._client = client
            self._connected = True
            self.announce(status)
        except BaseException:
            self._connected = False
            self._client = None
            client.disconnect()
            raise

    def _subscribe_broadcasts(self, client: MessageBrokerClient) -> bool:
        if not self._take_broadcasts:
            # A subscription an earlier process of this node left in its persistent session
            # would still bring every aggregate here (share_aggregate = false declines them).
            try:
                client.unsubscribe([self._broadcast], timeout=self.settings.send_timeout)
            except TransportError as exc:
                log.warning("%s could not drop the broadcast topic: %s", self.node_id, exc)
            return False
        try:
            client.subscribe([(self._broadcast, 1)], timeout=self.settings.send_timeout)
        except TransportError as exc:  # e.g. an ACL written before broadcasts: one by one
            log.warning("%s takes the aggregator's messages one by one: %s", self.node_id, exc)
            return False
        return True

    def take_broadcasts(self) -> None:
        self._take_broadcasts = True

    def close(self) -> None:
        if not self._connected or self._client is None:
            return
        self._connected = False
        client = self._client
        try:
            client.set_birth(status_topic(self.analysis_id, self.node_id), self._farewell()).wait(
                min(self.settings.send_timeout, 5.0)
            )
        except TransportError as exc:
            log.warning("%s could not publish its offline status: %s", self.node_id, exc)
        finally:
            client.disconnect()

    def _farewell(self) -> bytes:
        """The status left behind: a final state (done / failed + reason + epoch) stays, marked
        `online: false`, so `flame status` shows the outcome after every process is gone."""
        last = self._last_status
        if last.get("state") in FINAL_STATES:
            return self._status_payload({**last, "online": False})
        return self._status_payload(self.offline_status())

    def kill(self) -> None:
        """Vanish without a goodbye, as a crashed process does; the broker fires the will."""
        if self._client is not None:
            self._connected = False
            self._client.abort()

    def announce(self, status: dict[str, Any]) -> None:
        """Queue the new retained status; only the first (in `connect`) waits for the broker.

        Why not wait every time: a node announces two or three times per epoch, and each wait
        is a broker round trip on the epoch's critical path. The status still travels at QoS 1
        on the node's one connection, so it reaches watchers in order with the node's messages,
        survives reconnects (paho resends it) and is republished after every reconnect. A
        failure to deliver an earlier status is reported by the next call.
        """
        if not self._connected:
            raise TransportError(f"cannot announce: {self.node_id} is not connected")
        # `_last_status` first: a reconnect re-signing it meanwhile signs this one, not the one
        # before, so whichever copy arrives last (the higher `seq`) is the newest status.
        before, self._last_status = self._last_status, dict(status)
        payload = self._status_payload(status)
        if len(payload) > MAX_STATUS_BYTES:
            self._last_status = before
            raise TransportError(f"status of {len(payload)} bytes is over {MAX_STATUS_BYTES}")
        previous, self._status_pending = self._status_pending, None
        if previous is not None:
            refusal = previous.failed
            previous.abandon()  # superseded: its acknowledgement is no longer awaited
            if refusal is not None:
                raise TransportError(f"{self.node_id} could not announce its status: {refusal}")
        pending = self.client.set_birth(status_topic(self.analysis_id, self.node_id), payload)
        if self._announced:
            self._status_pending = pending
            return
        try:
            pending.wait(self.patience(len(payload)))
        except TransportError as exc:
            raise wrap_send_error(exc, f"{self.node_id} could not announce its status") from None
        self._announced = True

    def watch(self, nodes: Iterable[str] | None = None) -> None:
        if nodes is None:
            self._watching = None
            topics = [status_topic(self.analysis_id, "+")]
        else:
            wanted = {node for node in nodes if node != self.node_id}
            for node in wanted:
                if not _NAME.match(node):
                    raise ValueError(f"cannot watch {node!r}: not a valid node id")
            self._watching = wanted if self._watching is None else self._watching | wanted
            topics = [status_topic(self.analysis_id, node) for node in sorted(wanted)]
        for start in range(0, len(topics), 100):
            batch = [(topic, 1) for topic in topics[start : start + 100]]
            self.client.subscribe(batch, timeout=self.settings.send_timeout)

    def _check_sendable(self, envelope: Envelope) -> None:
        """TransportError unless this node can send `envelope` now, to a node of its run."""
        recipient = envelope.recipient
        self._check_conflict()
        if not self._connected:
            raise TransportError(f"cannot send to {recipient!r}: {self.node_id} is not connected")
        if not _NAME.match(recipient) or envelope.analysis != self.analysis_id:
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
        if len(recipients) < 2 or not self._connected:
            return super().broadcast(envelope, recipients, timeout)
        self._check_conflict()
        frame = self._broadcast_frame(envelope)
        if frame is None:  # chunks are signed per recipient
            return super().broadcast(envelope, recipients, timeout)
        try:
            pending = self.client.publish_nowait(self._broadcast, frame)
        except TransportError as exc:
            raise wrap_send_error(exc, f"cannot broadcast to {len(recipients)} nodes") from None
        self.bytes_sent += len(frame)
        wait = self.patience(len(frame), timeout)
        return Delivery([(f"{len(recipients)} nodes (broadcast)", pending)], wait)

    def probe_broadcast(self, envelope: Envelope) -> None:
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

    def receive(self, timeout: float) -> Envelope | None:
        if self._client is None:
            raise TransportError(f"{self.node_id} is not connected")
        client = self._client
        deadline = Deadline(timeout)
        while True:
            self._check_conflict()
            for dropped in self._reassembler.expire():
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
        if not _NAME.match(node):
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
            if broadcast and magic not in (MAGIC, SIGNED_MAGIC):
                raise MessageError("a broadcast is one whole frame (no chunks, no claim check)")
            if magic == CHUNK_MAGIC:
                if len(payload) > limit + _MAX_CHUNK_HEADER:
                    raise MessageError(f"chunk of {len(payload)} bytes is over the limit")
                whole = self._reassembler.add(payload)
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


def mqtt_transport_factory(
    settings: BrokerSettings,
    analysis_id: str,
    password: PasswordSource | None = None,
    **options: Any,
) -> Callable[[str], MqttTransport]:
    """`node_id -> MqttTransport` for runs that build one transport per node."""

    def make(node_id: str) -> MqttTransport:
        return MqttTransport(settings, analysis_id, node_id, password, **options)

    return make

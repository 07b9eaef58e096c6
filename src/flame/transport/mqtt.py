"""The transport over a real MQTT broker; behaves like `MemoryTransport`, across processes.

Topics (DESIGN.md): `flame/{analysis}/{node}/inbox` (QoS 1; a node subscribes to its own inbox
only, so broker ACLs can enforce that nobody reads another's mail) and
`flame/{analysis}/{node}/status` (retained; the last will sets `{"state": "offline"}`).

The transport's jobs live beside this module, which connects and puts them together:
`mqtt_status` (this node's retained status, the statuses it watches), `mqtt_send` (frames,
chunks, claim checks, broadcasts), `mqtt_receive` (decoding and dropping what fails a check)
and `mqtt_claims` (one process per node id, and the process generation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flame.clients.broker_address import ProtocolName
from flame.clients.message_broker_client import (
    MessageBrokerClient,
    PasswordSource,
    PendingPublish,
    Will,
)
from flame.errors import TransportError
from flame.transport.mqtt_claims import ProcessClaims
from flame.transport.mqtt_receive import MqttReceiving
from flame.transport.mqtt_send import MqttSending, wrap_send_error
from flame.transport.mqtt_status import MqttStatus
from flame.transport.topics import (
    VALID_NAME,
    broadcast_topic,
    client_id_for,
    inbox_topic,
    status_topic,
)
from flame.wire.chunks import ClaimCheck, Reassembler
from flame.wire.envelope import EVERYONE

if TYPE_CHECKING:
    from flame.config import BrokerSettings, FlameConfig
    from flame.identity.signing import Authenticator

__all__ = [
    "ClaimCheck",
    "MqttTransport",
    "client_id_for",
    "inbox_topic",
    "status_topic",
    "wrap_send_error",
]

log = logging.getLogger(__name__)


def password_from_settings(settings: BrokerSettings) -> PasswordSource | None:
    """The broker token from settings; a token file is re-read when it changes (rotation)."""
    from flame.clients.token import TokenSource

    source = TokenSource(settings, "message broker")
    return source.get if source.configured else None


class MqttTransport(MqttStatus, MqttSending, MqttReceiving, ProcessClaims):
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
            if not VALID_NAME.match(name):
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
        timeout = (
            reassembly_timeout if reassembly_timeout is not None else 2 * settings.send_timeout
        )
        self._reassembler = Reassembler(
            max_bytes=settings.max_message_bytes,
            timeout=timeout,
            max_transfers=max_transfers,
            max_total_bytes=max_reassembly_bytes,
        )
        # Chunks on the broadcast topic (one kick-off at a time from the aggregator) are
        # reassembled apart, within the same limits: a transfer id or a budget shared with
        # the inbox would let chunks of one channel complete or starve a transfer of the other.
        self._broadcast_reassembler = Reassembler(
            max_bytes=settings.max_message_bytes,
            timeout=timeout,
            max_transfers=max(2, max_transfers // 4),
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
        self._broadcast_reassembler.check = (  # signed for EVERYONE, by the aggregator
            None
            if auth is None
            else auth.chunk_check(self.analysis_id, EVERYONE, role="aggregation")
        )
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

    def kill(self) -> None:
        """Vanish without a goodbye, as a crashed process does; the broker fires the will."""
        if self._client is not None:
            self._connected = False
            self._client.abort()


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

"""MQTT for flame, on paho-mqtt 2.x: one connection that loses no QoS 1 message.

What this module adds to paho, and why:

* Persistent sessions (MQTT 5 `clean_start=False` + session expiry, or 3.1.1
  `clean_session=False`) under a client id that is stable across restarts, so messages sent
  while a node or the broker was down are delivered when it is back.
* Manual acknowledgements: a message is acknowledged (PUBACK) only when the application took
  it from `get()` and called `ack()`, so a process that dies with messages still in its local
  queue gets them again from the broker after a restart. A message taken before a reconnect is
  not acknowledged on the new connection (its packet id may mean another message there); the
  broker redelivers it instead: at least once, never lost.
* `publish` returns only after the broker's PUBACK (or raises `TransportError` after the
  timeout), also across reconnects, which paho's `wait_for_publish` does not survive.
* Presence: a last will, and a "birth" message (the retained status) republished after every
  reconnect, because the broker published the will when the connection dropped.
* A password callable re-read before every (re)connect, so a rotated token file is honoured.
* Errors that name the broker and the reason in one line and never contain the password.

The jobs live in their own modules: `broker_address` (the URL), `broker_connect` (connect,
disconnect, abort), `broker_session` (what happens at every reconnect), `broker_messages`
(publish, subscribe, receive, ack) and `acks` (waiting for the broker's answers); this one
puts them together as `MessageBrokerClient`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from flame.clients.acks import PendingPublish, _Acks
from flame.clients.broker_address import BrokerAddress, ProtocolName, parse_broker_url
from flame.clients.broker_connect import BrokerConnect, _no_delay
from flame.clients.broker_messages import BrokerMessages, IncomingMessage
from flame.clients.broker_session import PasswordSource
from flame.errors import TransportError

__all__ = [
    "BrokerAddress",
    "Consume",
    "Dispatch",
    "IncomingMessage",
    "MessageBrokerClient",
    "PasswordSource",
    "PendingPublish",
    "Will",
    "broker_connection",
    "parse_broker_url",
]


@dataclass(frozen=True)
class Will:
    """The message the broker publishes for this client when its connection dies."""

    topic: str
    payload: bytes | bytearray
    qos: int = 1
    retain: bool = True


class MessageBrokerClient(BrokerConnect, BrokerMessages):
    """One MQTT connection: persistent session, QoS 1, manual acks, presence, reconnects.

    paho's network thread runs the callbacks; they only enqueue, count or set events, so a slow
    application never stalls keep-alives. All blocking methods have a deadline.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        username: str | None = None,
        password: PasswordSource | None = None,
        ca_file: Path | str | None = None,
        cert_file: Path | str | None = None,
        key_file: Path | str | None = None,
        keepalive: int = 30,
        session_expiry: int = 3600,
        connect_timeout: float = 10.0,
        will: Will | None = None,
        protocol: ProtocolName | None = None,
        reconnect_delay: tuple[int, int] = (1, 16),
        receive_maximum: int = 32,
        max_inflight: int = 64,
    ) -> None:
        try:
            address = parse_broker_url(url)
        except ValueError as exc:
            raise TransportError(str(exc)) from None
        if protocol is not None:
            address = BrokerAddress(address.host, address.port, address.tls, protocol)
        self.address = address
        self.client_id = client_id
        self.username = username
        self._password = password
        self.keepalive = keepalive
        self.session_expiry = session_expiry
        self.connect_timeout = connect_timeout
        self._receive_maximum = receive_maximum
        self._inbox: queue.SimpleQueue[IncomingMessage] = queue.SimpleQueue()
        self._acks = _Acks()
        self._connected = threading.Event()
        self._first_connack = threading.Event()
        self._refusal: ReasonCode | None = None
        self._generation = 0
        self._subscriptions: dict[str, int] = {}
        self._birth: tuple[str, bytes] | None = None
        self._birth_lock = threading.Lock()
        self._started = False
        self._closing = False
        # Connections that found the broker without our session (restarted without
        # persistence, or the session expired): whatever was queued for us is gone.
        self.sessions_lost = 0
        # Called (network thread) on every reconnect; may return a new birth payload.
        self.on_reconnect: Callable[[], bytes | None] | None = None
        # Another client connected with our client id (MQTT 5 reason 0x8E): a second process
        # claims this node. We do not reconnect (that would take turns with it); the hook
        # (network thread) is told once.
        self.taken_over = False
        self.on_taken_over: Callable[[], None] | None = None
        # Subscribed again after every reconnect, even when the session is resumed, so their
        # retained messages are delivered again (a node reads its own status: who holds it?).
        self.refresh_topics: list[tuple[str, int]] = []

        v5 = address.protocol == "5"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if v5 else False,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            manual_ack=True,
        )
        paho_log = logging.getLogger(__name__ + ".paho")
        if paho_log.isEnabledFor(logging.DEBUG):
            # paho's own lines (socket errors during a broker restart) are noise at any higher
            # level: the callbacks below log what matters once.
            self._client.on_log = lambda client, userdata, level, text: paho_log.debug("%s", text)
        self._client.connect_timeout = connect_timeout
        self._client.reconnect_delay_set(*reconnect_delay)
        self._client.max_inflight_messages_set(max_inflight)
        if address.tls or ca_file is not None:
            self._configure_tls(ca_file, cert_file, key_file)
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._client.on_socket_open = _no_delay
        self._client.on_pre_connect = self._on_pre_connect
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_unsubscribe = self._on_subscribe  # UNSUBACKs: matched the same way


Consume = Callable[[float], "IncomingMessage | None"]
Dispatch = Callable[[str, bytes], None]


@contextlib.contextmanager
def broker_connection(
    url: str,
    *,
    client_id: str,
    topics: Iterable[str] = (),
    publish_timeout: float = 30.0,
    **options: Any,
) -> Iterator[tuple[Consume, Dispatch]]:
    """A connection for analyses with their own protocol: yields `(consume, dispatch)`.

    `consume(timeout)` returns the next message on `topics` (already acknowledged) or None;
    `dispatch(topic, payload)` publishes at QoS 1 and returns after the broker's PUBACK.
    `options` are `MessageBrokerClient` keyword arguments (username, password, ca_file, ...).
    """
    client = MessageBrokerClient(url, client_id=client_id, **options)
    client.connect()
    try:
        wanted = [(topic, 1) for topic in topics]
        client.subscribe(wanted, timeout=publish_timeout)

        def consume(timeout: float) -> IncomingMessage | None:
            message = client.get(timeout)
            if message is not None:
                client.ack(message)
            return message

        def dispatch(topic: str, payload: bytes) -> None:
            client.publish(topic, payload, timeout=publish_timeout)

        yield consume, dispatch
    finally:
        client.disconnect()

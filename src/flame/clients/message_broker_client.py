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
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from flame.clients.acks import PendingPublish, _Acks, reason_text
from flame.errors import FlameError, TransportError
from flame.utils.deadline import Deadline

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

log = logging.getLogger(__name__)

PasswordSource = Callable[[], "str | None"]
ProtocolName = Literal["5", "3.1.1"]

_SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True, "tls": True}
_PROTOCOLS: dict[str, ProtocolName] = {"5": "5", "5.0": "5", "3.1.1": "3.1.1", "311": "3.1.1"}


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is. `str()` is the form used in every log line and error."""

    host: str
    port: int
    tls: bool
    protocol: ProtocolName = "5"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://host:1883`, `mqtts://host:8883`, `host:port` or `host`; `?protocol=3.1.1` opts
    out of MQTT 5 for brokers without it (amqtt). Credentials in the URL are refused so they
    cannot leak into logs; they belong in the username and token settings."""
    text = url.strip()
    if not text:
        raise ValueError("broker URL is empty")
    if "://" not in text:
        text = "mqtt://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(
            "broker URL has an invalid port; expected mqtt://host:port or mqtts://host:port"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"broker URL scheme {scheme!r} is not supported; use mqtt:// or mqtts://")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "broker URL must not contain credentials; set the broker username and token instead"
        )
    if not parts.hostname:
        raise ValueError("broker URL has no host; expected mqtt://host:port")
    if parts.path not in ("", "/"):
        raise ValueError("broker URL must not have a path (websockets are not supported)")
    tls = _SCHEMES[scheme]
    protocol: ProtocolName = "5"
    query = parse_qs(parts.query)
    for key, values in query.items():
        if key != "protocol":
            raise ValueError(f"broker URL option {key!r} is unknown (known: protocol)")
        if values[-1] not in _PROTOCOLS:
            raise ValueError("broker URL option protocol must be 5 or 3.1.1")
        protocol = _PROTOCOLS[values[-1]]
    return BrokerAddress(parts.hostname, port or (8883 if tls else 1883), tls, protocol)


@dataclass(frozen=True)
class Will:
    """The message the broker publishes for this client when its connection dies."""

    topic: str
    payload: bytes | bytearray
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class IncomingMessage:
    """One message from the broker. Hand it back to `ack()` once it has been dealt with."""

    topic: str
    payload: bytes | bytearray
    qos: int
    retain: bool
    mid: int
    generation: int


def _refusal_text(reason: ReasonCode) -> str:
    """Mosquitto answers a wrong password with 'not authorized' (0x87), not 0x86: say both."""
    if reason.value == 0x87:
        return "not authorized: bad user name or password, or this user may not connect"
    return reason_text(reason)


def _read_file_setting(path: Path | str | None, what: str) -> str | None:
    if path is None:
        return None
    text = str(path)
    if not Path(text).is_file():
        raise TransportError(f"broker {what} {text} does not exist or is not a file")
    return text


class MessageBrokerClient:
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

    # --- configuration -----------------------------------------------------------------------

    def _configure_tls(
        self, ca_file: Path | str | None, cert_file: Path | str | None, key_file: Path | str | None
    ) -> None:
        ca = _read_file_setting(ca_file, "CA file")
        cert = _read_file_setting(cert_file, "client certificate")
        key = _read_file_setting(key_file, "client key")
        if key is not None and cert is None:
            raise TransportError("a broker client key needs a client certificate (cert_file)")
        try:
            self._client.tls_set(
                ca_certs=ca,
                certfile=cert,
                keyfile=key,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (ssl.SSLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise TransportError(
                f"broker {self.address}: cannot load the TLS files ({reason})"
            ) from None

    def _credentials(self) -> tuple[str | None, str | None]:
        password = None
        if self._password is not None:
            try:
                password = self._password()
            except FlameError as exc:  # flame's token errors name the file, never the token
                raise TransportError(f"broker {self.address}: {exc}") from None
            except Exception as exc:  # a user-provided source: name the error type only
                raise TransportError(
                    f"broker {self.address}: cannot read the broker token ({type(exc).__name__})"
                ) from None
        return self.username, password

    # --- paho callbacks (network thread) ------------------------------------------------------

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        try:
            username, password = self._credentials()
        except TransportError as exc:
            log.warning("%s", exc)
            return
        client.username_pw_set(username, password)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._refusal = reason
            self._first_connack.set()
            log.warning(
                "broker %s refused the connection of %s: %s",
                self.address,
                self.client_id,
                reason_text(reason),
            )
            return
        self._refusal = None
        self._generation += 1
        session_lost = self._generation > 1 and not flags.session_present
        if session_lost:
            self.sessions_lost += 1
        if self._generation > 1:
            log.info(
                "%s reconnected to broker %s (session %s)",
                self.client_id,
                self.address,
                "resumed" if flags.session_present else "new",
            )
        topics: dict[str, int] = {}
        if not flags.session_present:
            # The broker lost the session (no persistence, or it expired): subscribe again.
            topics.update(self._subscriptions)
        if self._generation > 1:
            topics.update(dict(self.refresh_topics))
        if topics:
            rc, mid = client.subscribe(list(topics.items()))
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._acks.expect(mid)  # so its SUBACK is consumed, not parked
        with self._birth_lock:
            if self._birth is not None and self._generation > 1:
                if self.on_reconnect is not None:  # re-signed: a replay cannot pass for it
                    try:
                        renewed = self.on_reconnect()
                    except Exception as exc:  # a hook must not break the network thread
                        log.warning("%s: reconnect hook failed: %r", self.client_id, exc)
                        renewed = None
                    if renewed is not None:
                        self._birth = (self._birth[0], renewed)
                client.publish(self._birth[0], self._birth[1], qos=1, retain=True)
        self._connected.set()
        self._first_connack.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if reason.value == 0x8E and not self._closing and not self.taken_over:
            self.taken_over = True
            log.error(
                "%s: another client connected to broker %s with this client id (session taken "
                "over); not reconnecting",
                self.client_id,
                self.address,
            )
            client.disconnect()  # marks the connection closed on purpose: paho stops retrying
            if self.on_taken_over is not None:
                try:
                    self.on_taken_over()
                except Exception as exc:  # a hook must not break the network thread
                    log.warning("%s: taken-over hook failed: %r", self.client_id, exc)
            return
        if was_connected and not self._closing:
            log.warning(
                "%s lost the connection to broker %s (%s); reconnecting",
                self.client_id,
                self.address,
                "connection closed" if reason.value == 0x80 else reason_text(reason),
            )

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = ""
        self._inbox.put(
            IncomingMessage(
                topic=topic,
                payload=message.payload,
                qos=message.qos,
                retain=bool(message.retain),
                mid=message.mid,
                generation=self._generation,
            )
        )

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._acks.resolve(mid, [reason], park=False)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._acks.resolve(mid, list(reasons), park=True)

    # --- connection ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def connect(self) -> None:
        """Connect within `connect_timeout`, retrying while the broker is unreachable.

        A refusal (bad credentials, not authorized) or a TLS verification failure is final at
        once: retrying cannot fix it, and the error says what to fix.
        """
        if self._started:
            raise TransportError(f"{self.client_id} is already connected to {self.address}")
        deadline = Deadline(self.connect_timeout)
        username, password = self._credentials()
        self._client.username_pw_set(username, password)
        properties = None
        clean_start: bool | Literal[3] = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if self.address.protocol == "5":
            clean_start = False
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self.session_expiry
            properties.ReceiveMaximum = self._receive_maximum
        delay = 0.1
        while True:
            try:
                self._client.connect(
                    self.address.host,
                    self.address.port,
                    keepalive=self.keepalive,
                    clean_start=clean_start,
                    properties=properties,
                )
                break
            except ssl.SSLError as exc:
                reason = getattr(exc, "reason", None) or getattr(exc, "verify_message", None)
                raise TransportError(
                    f"cannot connect to broker {self.address}: TLS handshake failed "
                    f"({reason or type(exc).__name__})"
                ) from None
            except (OSError, ValueError) as exc:
                reason = _os_error_text(exc)
                if deadline.passed():
                    raise TransportError(
                        f"cannot connect to broker {self.address}: {reason} "
                        f"(gave up after {self.connect_timeout:g} s)"
                    ) from None
                log.info("broker %s not reachable yet (%s); retrying", self.address, reason)
                time.sleep(min(delay, deadline.left()))
                delay = min(delay * 2, 2.0)
        self._client.loop_start()
        self._started = True
        self._check_descriptors()
        if not self._first_connack.wait(max(deadline.left(), 0.5)):
            self._stop()
            hint = (
                " (a broker without MQTT 5, such as amqtt, needs ?protocol=3.1.1 on the URL)"
                if self.address.protocol == "5"
                else ""
            )
            raise TransportError(
                f"cannot connect to broker {self.address}: no answer to CONNECT within "
                f"{self.connect_timeout:g} s{hint}"
            )
        if self._refusal is not None:
            refusal = self._refusal
            self._stop()
            raise TransportError(
                f"broker {self.address} refused the connection: {_refusal_text(refusal)}"
            )
        log.info("%s connected to broker %s", self.client_id, self.address)

    def _check_descriptors(self) -> None:
        """paho waits with select(), which cannot watch descriptors numbered 1024 or more: such
        a connection would hang silently, so refuse it with the reason instead."""
        handles = [self._client.socket(), self._client._sockpairR]
        highest = max((h.fileno() for h in handles if h is not None), default=-1)
        if highest >= 1024:
            self._stop()
            raise TransportError(
                f"cannot connect to broker {self.address}: this process has too many open "
                f"files for paho-mqtt (descriptor {highest} >= 1024, the select() limit); "
                "run fewer nodes per process"
            )

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def disconnect(self, timeout: float = 5.0) -> None:
        """Leave cleanly (no last will); the persistent session stays on the broker."""
        if not self._started:
            return
        self._closing = True
        with self._birth_lock:
            self._birth = None
        self._stop(timeout)

    def abort(self, timeout: float = 5.0) -> None:
        """Drop the connection without a goodbye, as a crashed process does: the will fires."""
        if not self._started:
            return
        self._closing = True
        self._client._thread_terminate = True  # so the loop exits instead of reconnecting
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._join_loop(timeout)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _stop(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(OSError):
            self._client.disconnect()
        self._join_loop(timeout)

    def _join_loop(self, timeout: float) -> None:
        """paho's `loop_stop()` waits for its thread without a deadline; this has one."""
        thread = self._client._thread
        self._client._thread_terminate = True
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("%s: the MQTT network thread did not stop in time", self.client_id)
        self._started = False
        self._connected.clear()

    # --- messages -----------------------------------------------------------------------------

    def set_birth(self, topic: str, payload: bytes) -> PendingPublish:
        """Publish `payload` retained on `topic` now and again after every reconnect."""
        with self._birth_lock:
            self._birth = (topic, payload)
            return self.publish_nowait(topic, payload, qos=1, retain=True)

    def publish_nowait(
        self, topic: str, payload: bytes | bytearray, *, qos: int = 1, retain: bool = False
    ) -> PendingPublish:
        """Queue a QoS 1 publish; paho sends it now or after the next reconnect."""
        if qos != 1:
            raise ValueError("flame publishes at QoS 1 only")
        # paho's lock: its network thread cannot handle the PUBACK before we expect it.
        with self._client._out_message_mutex:
            try:
                info = self._client.publish(topic, payload, qos=qos, retain=retain)
            except ValueError as exc:
                raise TransportError(f"cannot publish on {topic}: {exc}") from None
            if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                raise TransportError(f"cannot publish on {topic}: the outgoing queue is full")
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                raise TransportError(f"cannot publish on {topic}: {reason_text(info.rc)}")
            waiter = self._acks.expect(info.mid)
        return PendingPublish(self, topic, info.mid, waiter)

    def publish(
        self,
        topic: str,
        payload: bytes | bytearray,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 30.0,
    ) -> None:
        """Publish and return after the broker's PUBACK; TransportError after `timeout`."""
        self.publish_nowait(topic, payload, qos=qos, retain=retain).wait(timeout)

    def subscribe(self, topics: Sequence[tuple[str, int]], *, timeout: float = 30.0) -> None:
        """Subscribe and wait for the SUBACK; TransportError naming a refused topic."""
        if not topics:
            return
        for topic, qos in topics:
            self._subscriptions[topic] = qos
        first = f"subscribe to {topics[0][0]}"
        reasons = self._acknowledged(first, lambda: self._client.subscribe(list(topics)), timeout)
        for (topic, _), reason in zip(topics, reasons, strict=False):
            if reason.is_failure:
                self._subscriptions.pop(topic, None)
                raise TransportError(
                    f"broker {self.address} refused the subscription to {topic}: "
                    f"{reason_text(reason)}"
                )

    def unsubscribe(self, topics: Sequence[str], *, timeout: float = 30.0) -> None:
        """Unsubscribe (also from what an earlier process left in the persistent session) and
        wait for the UNSUBACK; TransportError if it does not come in time."""
        if not topics:
            return
        for topic in topics:
            self._subscriptions.pop(topic, None)
        first = f"unsubscribe from {topics[0]}"
        self._acknowledged(first, lambda: self._client.unsubscribe(list(topics)), timeout)

    def read_retained(self, topic: str, timeout: float) -> bytes | None:
        """The message the broker retains on `topic`, or None: subscribed at QoS 0 (no
        in-flight quota can hold it back) and unsubscribed at once. The broker sends a retained
        message before it answers the next request, so there is no waiting for one that may
        not exist. For a connection of its own: other messages that arrive are dropped."""
        self.subscribe([(topic, 0)], timeout=timeout)
        self.unsubscribe([topic], timeout=timeout)
        found: bytes | None = None
        while (message := self.get(0)) is not None:
            if message.topic == topic and message.retain:
                found = bytes(message.payload)
        return found

    def _acknowledged(
        self, what: str, request: Callable[[], tuple[MQTTErrorCode, int | None]], timeout: float
    ) -> list[ReasonCode]:
        """Send a (un)subscribe once connected and wait for the broker's answer: its reasons."""
        deadline = Deadline(timeout)
        if not self._connected.wait(deadline.left()):
            raise TransportError(f"cannot {what}: not connected to broker {self.address}")
        rc, mid = request()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise TransportError(f"cannot {what} on broker {self.address}: {reason_text(rc)}")
        waiter = self._acks.expect(mid)
        if not waiter.wait(deadline.left()):
            self._acks.forget(mid, waiter)
            raise TransportError(
                f"broker {self.address} did not acknowledge the request to {what} "
                f"within {timeout:g} s"
            )
        return list(waiter.reasons)

    def get(self, timeout: float) -> IncomingMessage | None:
        """The next incoming message, or None after `timeout` seconds."""
        try:
            return self._inbox.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def ack(self, message: IncomingMessage) -> None:
        """Acknowledge a message from `get()`; the broker will not deliver it again."""
        if message.qos > 0 and message.generation == self._generation and self.connected:
            self._client.ack(message.mid, message.qos)


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Small packets (PUBACKs, small messages) go out at once instead of waiting for Nagle:
    without this a QoS 1 round trip costs the peer's 40 ms delayed-ACK timer."""
    raw = sock if isinstance(sock, socket.socket) else getattr(sock, "_socket", None)
    if isinstance(raw, socket.socket) and raw.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _os_error_text(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return type(exc).__name__


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

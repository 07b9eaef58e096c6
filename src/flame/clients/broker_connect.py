"""Opening and closing the broker connection, on the caller's thread (`MessageBrokerClient`).

Why a module of its own: connecting is where the errors an operator has to fix appear. It
retries while the broker is unreachable, but a refusal (credentials, not authorized) or a
failed TLS verification is final at once, with the reason; a descriptor over select()'s limit
is refused instead of hanging; and leaving is either clean (no last will) or an abort, as a
crashed process leaves (the will fires), each with a deadline on paho's network thread.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from flame.clients.acks import reason_text
from flame.clients.broker_session import BrokerSession
from flame.errors import TransportError
from flame.utils.deadline import Deadline

__all__ = ["BrokerConnect"]

log = logging.getLogger(__name__)


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


class BrokerConnect(BrokerSession):
    """Mixin of `MessageBrokerClient`: connect, disconnect, abort."""

    keepalive: int
    session_expiry: int
    connect_timeout: float
    _receive_maximum: int
    _started: bool

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

    # --- connection ---------------------------------------------------------------------------

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

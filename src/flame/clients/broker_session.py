"""The broker session as the connection comes and goes (`MessageBrokerClient`'s part).

Why a module of its own: this is what paho's network thread runs at every (re)connect and
disconnect, apart from the caller's side of connecting (`broker_connect`) and from messages
(`broker_messages`). The persistent session is subscribed again when the broker lost it,
the `refresh_topics` on every reconnect, the birth (retained status) is republished, re-signed
by the `on_reconnect` hook, the password is re-read before every attempt, and a take-over by
another client with this client id (MQTT 5 reason 0x8E) stops the reconnecting.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from flame.clients.acks import _Acks, reason_text
from flame.errors import FlameError, TransportError

if TYPE_CHECKING:
    from flame.clients.broker_address import BrokerAddress

__all__ = ["BrokerSession", "PasswordSource"]

log = logging.getLogger(__name__)

PasswordSource = Callable[[], "str | None"]


class BrokerSession:
    """Mixin of `MessageBrokerClient`: its state, and the callbacks that keep its session."""

    address: BrokerAddress
    client_id: str
    username: str | None
    _password: PasswordSource | None
    _client: mqtt.Client
    _acks: _Acks
    _connected: threading.Event
    _first_connack: threading.Event
    _refusal: ReasonCode | None
    _generation: int
    _subscriptions: dict[str, int]
    _birth: tuple[str, bytes] | None
    _birth_lock: threading.Lock
    _closing: bool
    sessions_lost: int
    on_reconnect: Callable[[], bytes | None] | None
    taken_over: bool
    on_taken_over: Callable[[], None] | None
    refresh_topics: list[tuple[str, int]]

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

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

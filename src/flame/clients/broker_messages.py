"""Messages over the broker connection (`MessageBrokerClient`'s part).

Why a module of its own: the connection's other job, apart from keeping it up. A publish
returns after the broker's PUBACK (matched in `acks`), a (un)subscribe after its SUBACK; what
arrives waits in a local queue until `get()`, and is acknowledged to the broker only by
`ack()`, so a process that dies with messages still queued gets them again after a restart.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from flame.clients.acks import PendingPublish, reason_text
from flame.clients.broker_session import BrokerSession
from flame.errors import TransportError
from flame.utils.deadline import Deadline

__all__ = ["BrokerMessages", "IncomingMessage"]


@dataclass(frozen=True)
class IncomingMessage:
    """One message from the broker. Hand it back to `ack()` once it has been dealt with."""

    topic: str
    payload: bytes | bytearray
    qos: int
    retain: bool
    mid: int
    generation: int


class BrokerMessages(BrokerSession):
    """Mixin of `MessageBrokerClient`: publish, subscribe, receive and acknowledge."""

    _inbox: queue.SimpleQueue[IncomingMessage]

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

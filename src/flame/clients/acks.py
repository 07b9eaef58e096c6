"""Broker acknowledgements (PUBACK, SUBACK) matched to whoever waits for them.

Split from `message_broker_client` (the connection) because waiting is its own job: a wait
that runs out raises `NotAcknowledged`, which is not a refusal (the message stays queued in
paho and goes out after a reconnect), so callers can tell "not yet" from "never".
"""

from __future__ import annotations

import threading
from typing import Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from flame.errors import NotAcknowledged, TransportError

__all__ = ["AckOwner", "PendingPublish", "reason_text"]


class AckOwner(Protocol):
    """What a pending publish needs of its connection."""

    @property
    def address(self) -> object: ...

    @property
    def connected(self) -> bool: ...

    @property
    def _acks(self) -> _Acks: ...


class _Waiter:
    """A broker acknowledgement (PUBACK or SUBACK) someone is waiting for."""

    __slots__ = ("_event", "reasons")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reasons: list[ReasonCode] = []

    def resolve(self, reasons: list[ReasonCode]) -> None:
        self.reasons = reasons
        self._event.set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


class _Acks:
    """Matches broker acknowledgements (PUBACK, SUBACK) to waiters by packet id.

    A publish registers its packet id while holding paho's outgoing-message lock, which paho
    also holds while it handles a PUBACK, so a PUBACK always finds its waiter, and one nobody
    waits for (a waiter gave up, a birth republish) is simply ignored. SUBACKs are handled
    without that lock, so one that arrives before its waiter registered is parked until it is
    claimed. Lock order is always paho's lock, then this one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, _Waiter] = {}
        self._early: dict[int, list[ReasonCode]] = {}

    def expect(self, mid: int) -> _Waiter:
        waiter = _Waiter()
        with self._lock:
            early = self._early.pop(mid, None)
            if early is None:
                self._waiting[mid] = waiter
        if early is not None:
            waiter.resolve(early)
        return waiter

    def resolve(self, mid: int, reasons: list[ReasonCode], *, park: bool) -> None:
        with self._lock:
            waiter = self._waiting.pop(mid, None)
            if waiter is None:
                if park:
                    self._early[mid] = reasons
                return
        waiter.resolve(reasons)

    def forget(self, mid: int, waiter: _Waiter | None = None) -> None:
        """Stop waiting for `mid` (only if `waiter` is still the one waiting: ids are reused)."""
        with self._lock:
            if waiter is None or self._waiting.get(mid) is waiter:
                self._waiting.pop(mid, None)


class PendingPublish:
    """A publish on its way to the broker; `wait()` blocks until the PUBACK."""

    def __init__(self, client: AckOwner, topic: str, mid: int, waiter: _Waiter) -> None:
        self._client = client
        self.topic = topic
        self.mid = mid
        self._waiter = waiter
        self.done = False

    def wait(self, timeout: float) -> None:
        """Return once the broker accepted the message; raise TransportError otherwise."""
        if self.done:
            return
        if not self._waiter.wait(timeout):
            self._client._acks.forget(self.mid, self._waiter)
            self.done = True
            state = "" if self._client.connected else " (the connection is down)"
            raise NotAcknowledged(
                f"broker {self._client.address} did not acknowledge the message on "
                f"{self.topic} within {timeout:g} s{state}"
            )
        self.done = True
        failures = [reason for reason in self._waiter.reasons if reason.is_failure]
        if failures:
            raise TransportError(
                f"broker {self._client.address} refused the message on {self.topic}: "
                f"{reason_text(failures[0])}"
            )

    def abandon(self) -> None:
        if not self.done:
            self.done = True
            self._client._acks.forget(self.mid, self._waiter)

    @property
    def acknowledged(self) -> bool:
        return self._waiter.wait(0)

    @property
    def failed(self) -> str | None:
        """The broker's refusal, if it has answered with one; None while it has not answered."""
        if not self._waiter.wait(0):
            return None
        failures = [reason for reason in self._waiter.reasons if reason.is_failure]
        if not failures:
            return None
        return f"broker {self._client.address} refused the message on {self.topic}: " + (
            reason_text(failures[0])
        )


def reason_text(reason: ReasonCode | MQTTErrorCode | int) -> str:
    if isinstance(reason, ReasonCode):
        text = reason.getName()
    elif isinstance(reason, MQTTErrorCode):
        text = mqtt.error_string(reason)
    else:
        text = f"code {reason}"
    text = text.strip().rstrip(".")
    return text[:1].lower() + text[1:]

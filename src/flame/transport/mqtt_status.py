"""This node's retained status on the broker, and the statuses it watches (`MqttTransport`).

Why a module of its own: statuses are the transport's presence, apart from moving messages.
Each status is signed and bound to this process (`Transport.sign_status`), re-signed with the
next `seq` after every reconnect, queued without a wait after the first one (a broker round
trip per announcement would sit on the epoch's critical path) and, when the node leaves,
replaced by its farewell: a final state stays, marked `online: false`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from flame.errors import TransportError
from flame.transport.base import MAX_STATUS_BYTES, Transport
from flame.transport.mqtt_send import wrap_send_error
from flame.transport.topics import VALID_NAME, status_topic
from flame.wire.envelope import to_jsonable

if TYPE_CHECKING:
    from flame.clients.message_broker_client import MessageBrokerClient, PendingPublish
    from flame.config import BrokerSettings

__all__ = ["FINAL_STATES", "MqttStatus"]

FINAL_STATES = ("done", "failed")


class MqttStatus(Transport):
    """Mixin of `MqttTransport`: announce this node's status, watch other nodes' statuses."""

    settings: BrokerSettings
    _connected: bool
    _announced: bool
    _status_pending: PendingPublish | None
    _last_status: dict[str, Any]
    _heard_broadcast: bool
    _watching: set[str] | None

    if TYPE_CHECKING:

        @property
        def client(self) -> MessageBrokerClient: ...

        @property
        def link(self) -> int: ...

        def patience(self, size: int, timeout: float | None = None) -> float: ...

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

    def _farewell(self) -> bytes:
        """The status left behind: a final state (done / failed + reason + epoch) stays, marked
        `online: false`, so `flame status` shows the outcome after every process is gone."""
        last = self._last_status
        if last.get("state") in FINAL_STATES:
            return self._status_payload({**last, "online": False})
        return self._status_payload(self.offline_status())

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
                if not VALID_NAME.match(node):
                    raise ValueError(f"cannot watch {node!r}: not a valid node id")
            self._watching = wanted if self._watching is None else self._watching | wanted
            topics = [status_topic(self.analysis_id, node) for node in sorted(wanted)]
        for start in range(0, len(topics), 100):
            batch = [(topic, 1) for topic in topics[start : start + 100]]
            self.client.subscribe(batch, timeout=self.settings.send_timeout)

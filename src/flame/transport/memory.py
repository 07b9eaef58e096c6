"""An in-process broker: what `flame simulate` and `flame.testing` run on.

Frames really are encoded and decoded on the way through, so an analysis that runs here
sends exactly what it would send over MQTT, and bad values fail here first.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from flame.errors import MessageError, TransportError
from flame.identity.signing import SignatureError
from flame.transport.base import Transport
from flame.utils.deadline import Deadline
from flame.wire.envelope import DEFAULT_MAX_BYTES, Envelope, encode, to_jsonable

if TYPE_CHECKING:
    from flame.identity.signing import Authenticator

__all__ = ["MemoryBroker", "MemoryTransport"]

log = logging.getLogger(__name__)


class MemoryBroker:
    """Inboxes, retained statuses and status subscriptions, shared by the nodes of a process.

    `duplicate_every=N` delivers every N-th message twice (at-least-once in earnest);
    `on_send` sees each envelope before delivery and may return False to drop it.
    """

    def __init__(
        self,
        *,
        duplicate_every: int = 0,
        max_message_bytes: int = DEFAULT_MAX_BYTES,
        on_send: Callable[[Envelope], bool] | None = None,
    ) -> None:
        self.duplicate_every = duplicate_every
        self.max_message_bytes = max_message_bytes
        self.on_send = on_send
        self._lock = threading.Lock()
        # An inbox holds frames (bytes) and status changes ((node, status JSON) pairs).
        self._inboxes: dict[tuple[str, str], queue.SimpleQueue[bytes | tuple[str, bytes]]] = {}
        self._statuses: dict[tuple[str, str], dict[str, Any]] = {}
        self._watchers: dict[tuple[str, str], set[str] | None] = {}
        self._sent = 0
        self.delivered: list[Envelope] = []
        self.record = False

    def inbox(
        self, analysis_id: str, node_id: str
    ) -> queue.SimpleQueue[bytes | tuple[str, bytes]]:
        with self._lock:
            return self._inboxes.setdefault((analysis_id, node_id), queue.SimpleQueue())

    def publish(self, envelope: Envelope, frame: bytes | None = None) -> int:
        """Deliver one envelope (as `frame`, its signed form, when given); returns its size."""
        if frame is None:
            frame = encode(envelope)
        if len(frame) > self.max_message_bytes:
            raise TransportError(
                f"message to {envelope.recipient!r} is {len(frame)} bytes, over the broker "
                f"limit of {self.max_message_bytes}"
            )
        if self.on_send is not None and not self.on_send(replace(envelope, signed=frame)):
            return len(frame)
        inbox = self.inbox(envelope.analysis, envelope.recipient)
        with self._lock:
            self._sent += 1
            twice = self.duplicate_every > 0 and self._sent % self.duplicate_every == 0
            if self.record:
                self.delivered.append(envelope)
        inbox.put(frame)
        if twice:
            inbox.put(frame)
        return len(frame)

    def inject(self, analysis_id: str, node_id: str, frame: bytes) -> None:
        """Put raw bytes in an inbox, as a hostile or broken publisher could."""
        self.inbox(analysis_id, node_id).put(frame)

    def set_status(self, analysis_id: str, node_id: str, status: dict[str, Any]) -> None:
        with self._lock:
            self._statuses[(analysis_id, node_id)] = dict(status)
            targets = [
                watcher
                for (analysis, watcher), nodes in self._watchers.items()
                if analysis == analysis_id
                and watcher != node_id
                and (nodes is None or node_id in nodes)
            ]
        for watcher in targets:
            self._deliver_status(analysis_id, watcher, node_id, status)

    def statuses(self, analysis_id: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {node: dict(s) for (a, node), s in self._statuses.items() if a == analysis_id}

    def add_watch(self, analysis_id: str, watcher: str, nodes: set[str] | None) -> None:
        with self._lock:
            self._watchers[(analysis_id, watcher)] = nodes
            retained = [
                (node, dict(s))
                for (a, node), s in self._statuses.items()
                if a == analysis_id and node != watcher and (nodes is None or node in nodes)
            ]
        for node, status in retained:
            self._deliver_status(analysis_id, watcher, node, status)

    def _deliver_status(
        self, analysis_id: str, watcher: str, node: str, status: dict[str, Any]
    ) -> None:
        payload = json.dumps(to_jsonable(status), separators=(",", ":")).encode()
        self.inbox(analysis_id, watcher).put((node, payload))


class MemoryTransport(Transport):
    """One node's handle on a `MemoryBroker`."""

    keeps_sessions = False  # nothing outlives the simulation: no drain at the end

    def __init__(
        self,
        broker: MemoryBroker,
        analysis_id: str,
        node_id: str,
        *,
        auth: Authenticator | None = None,
    ) -> None:
        super().__init__(analysis_id, node_id, auth=auth)
        self.broker = broker
        self._inbox = broker.inbox(analysis_id, node_id)
        self._connected = False
        self._last_status: dict[str, Any] = {}

    def connect(self, status: dict[str, Any]) -> None:
        self._connected = True
        self.announce(status)

    def close(self) -> None:
        if self._connected:
            self._connected = False
            last = self._last_status
            farewell: dict[str, Any] = {"state": "offline"}
            if last.get("state") in ("done", "failed"):
                farewell = {**last, "online": False}
            self.broker.set_status(self.analysis_id, self.node_id, self.sign_status(farewell))

    def kill(self) -> None:
        """Vanish without a goodbye, as a crashed process does; the 'last will' fires."""
        self._last_status = {}
        self.close()

    def send(self, envelope: Envelope, timeout: float | None = None) -> None:
        if not self._connected:
            raise TransportError(
                f"cannot send to {envelope.recipient!r}: {self.node_id} is not connected"
            )
        self.bytes_sent += self.broker.publish(envelope, b"".join(self.outgoing(envelope)))

    def receive(self, timeout: float) -> Envelope | None:
        deadline = Deadline(timeout)
        while True:
            try:
                item = self._inbox.get(timeout=deadline.left())
            except queue.Empty:
                return None
            if isinstance(item, tuple):
                status = self.status_envelope(*item)
                if status is not None:
                    return status
                continue
            frame = item
            self.bytes_received += len(frame)
            try:
                envelope = self.incoming(frame, max_bytes=self.broker.max_message_bytes)
            except SignatureError:
                continue  # counted and logged (WARNING, claimed sender) by the authenticator
            except MessageError as exc:
                log.warning("%s dropped a malformed message: %s", self.node_id, exc)
                continue
            except Exception as exc:  # a decoder bug must not take the node down either
                log.error("%s dropped a message it could not decode: %r", self.node_id, exc)
                continue
            if envelope.analysis != self.analysis_id or envelope.recipient != self.node_id:
                log.warning(
                    "%s dropped a message addressed to %s/%s",
                    self.node_id,
                    envelope.analysis,
                    envelope.recipient,
                )
                continue
            return envelope

    def announce(self, status: dict[str, Any]) -> None:
        if not self._connected:  # as MQTT: a crashed or closed node says nothing more
            raise TransportError(f"cannot announce: {self.node_id} is not connected")
        self._last_status = dict(status)
        self.broker.set_status(self.analysis_id, self.node_id, self.sign_status(status))

    def watch(self, nodes: Iterable[str] | None = None) -> None:
        self.broker.add_watch(self.analysis_id, self.node_id, None if nodes is None else set(nodes))

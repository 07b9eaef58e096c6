"""One process per node id, and which process of a node came first (MqttTransport's part).

Why a module of its own: the transport's job is moving messages; this is about who holds a
node's broker session. Two live processes with one node id take the session in turns (MQTT
5 reason 0x8E, or another live instance in the retained status after a reconnect): the one
that notices stops and reports the conflict. A new process reads the generation of the
node's retained status first, so that it is ordered after its predecessor whatever the
clocks say (`flame.transport.status_order`).
"""

from __future__ import annotations

import abc
import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from flame.errors import TransportError
from flame.transport.status_order import process_generation
from flame.transport.topics import client_id_for, status_topic

if TYPE_CHECKING:
    from flame.clients.message_broker_client import (
        IncomingMessage,
        MessageBrokerClient,
        Will,
    )
    from flame.config import BrokerSettings
    from flame.identity.signing import Authenticator
    from flame.transport.generation import GenerationStore

__all__ = ["ProcessClaims"]

log = logging.getLogger(__name__)


class ProcessClaims(abc.ABC):
    """Mixin of `MqttTransport`: conflict detection and the process generation."""

    analysis_id: str
    node_id: str
    instance: str
    since: float
    generation: int
    auth: Authenticator | None
    settings: BrokerSettings
    conflict: str | None
    _client: MessageBrokerClient | None
    _connected: bool
    generation_store: GenerationStore | None = None  # this node's own copy (see generation)

    @abc.abstractmethod
    def _new_client(
        self, client_id: str, will: Will | None, session_expiry: int | None = None
    ) -> MessageBrokerClient:
        """A broker client with this node's settings and credentials."""

    @abc.abstractmethod
    def _status_payload(self, status: dict[str, Any]) -> bytes:
        """`status` signed, as published."""

    def _on_taken_over(self) -> None:
        """(network thread) Another process connected as this node and took its session."""
        self.conflict = (
            f"two processes claim node {self.node_id!r}: another process took over this node's "
            f"broker session; this one (instance {self.instance}) stops instead of taking turns"
        )
        threading.Thread(target=self._report_conflict, name="flame-conflict", daemon=True).start()

    def _report_conflict(self) -> None:
        """Tell the run, through a short connection of its own (the node's session belongs to
        the other process now): a signed status naming this instance, so the aggregator (or,
        for a duplicated aggregator, every node) stops the run within seconds."""
        side_id = client_id_for(self.analysis_id, self.node_id)[:100] + ":" + self.instance[:12]
        status = {"state": "failed", "conflict": self.instance, "reason": self.conflict}
        try:
            side = self._new_client(side_id, None, session_expiry=0)
            side.connect()
            try:
                side.publish(
                    status_topic(self.analysis_id, self.node_id),
                    self._status_payload(status),
                    retain=True,
                    timeout=min(self.settings.send_timeout, 5.0),
                )
            finally:
                side.disconnect()
        except Exception as exc:  # best effort: the aggregator also sees instances alternate
            log.error("%s could not report the second process: %s", self.node_id, exc)

    def _own_status(self, message: IncomingMessage) -> None:
        """This node's status topic, as the broker holds it. Another live instance there after
        we reconnected means two processes take this node's session in turns: stop, say so."""
        if not message.payload or self.conflict is not None:
            return
        try:
            status = json.loads(message.payload)
        except (ValueError, RecursionError):
            return
        if not isinstance(status, dict):
            return
        other = status.get("instance")
        if not isinstance(other, str) or other == self.instance:
            return
        if status.get("state") == "offline" or status.get("online") is False:
            return  # an earlier process's farewell or last will
        if not message.retain or message.generation <= 1:
            # Only the broker's current state after a reconnect of ours counts: live copies
            # may be an earlier process's statuses still queued in the session, and the state
            # at our first connect is what an earlier process left behind.
            return
        if self.auth is not None and not self.auth.verify_status(
            self.analysis_id, self.node_id, status
        ):
            return
        since, gen = status.get("since"), process_generation(status)
        if self.auth is not None and (
            not isinstance(since, int | float)
            or gen is None
            or (gen, since) <= (self.generation, self.since)
        ):
            # An earlier process of this node: a leftover, or an old status replayed as
            # retained to make this one stop. A live later process is what a conflict is.
            log.warning(
                "%s ignored a stale status of an earlier process of this node (instance %s)",
                self.node_id,
                other[:32],
            )
            return
        self.conflict = (
            f"two processes claim node {self.node_id!r} (instances {self.instance}, {other}): "
            "they take this node's broker session in turns; this one stops"
        )
        log.error("%s", self.conflict)
        self._report_conflict()
        if self._client is not None:
            self._connected = False
            self._client.disconnect()

    def _next_generation(self) -> int:
        """One more than the higher of the generation of this node's status the broker holds
        (0 if none) and the one in its own storage (`flame.transport.generation`):
        what orders this process after its predecessors, whatever either clock says. Read on
        a short connection of its own, because the last will (signed with the generation)
        must be fixed before the node's own connection is made."""
        side_id = client_id_for(self.analysis_id, self.node_id)[:100] + ":" + self.instance[:12]
        side = self._new_client(side_id, None, session_expiry=0)
        side.connect()
        try:
            payload = side.read_retained(
                status_topic(self.analysis_id, self.node_id), self.settings.send_timeout
            )
        finally:
            side.disconnect()
        previous = 0
        try:
            status = json.loads(payload) if payload else None
        except (ValueError, RecursionError):
            status = None
        if isinstance(status, dict) and (
            self.auth is None or self.auth.verify_status(self.analysis_id, self.node_id, status)
        ):
            previous = process_generation(status) or 0
        keeper = self.generation_store
        if keeper is None:
            log.info(
                "%s keeps no process generation of its own (no storage configured): if the "
                "broker loses its retained status, a restart with the clock stepped back is "
                "taken for a stale replay",
                self.node_id,
            )
            return previous + 1
        generation = max(previous, keeper.load()) + 1  # never lowered by a lost status
        keeper.save(generation)
        return generation

    def _check_conflict(self) -> None:
        if self.conflict is not None:
            raise TransportError(self.conflict)

"""What the aggregator sends, and the word of the broker and the nodes that it arrived.

A part of `Aggregator` (`flame.aggregator.server`), kept apart from the epoch loop: kick-offs
go to every participant (a broadcast or a copy each, as `fanout` decides) and the broker's
acceptance is confirmed while the results come in; every control message names this process
(`session`) and carries no aggregate for a node that declines it; results are acknowledged end
to end, by the next kick-off or, when aggregating is slow, by an explicit `ack`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, NamedTuple

from flame.aggregator.fanout import Fanout
from flame.errors import NotAcknowledged, RunFailed, TransportError
from flame.transport.base import Delivery, Transport
from flame.wire.envelope import EVERYONE, Envelope, Kind

__all__ = ["SEND_TIMEOUT", "Ack", "Sending"]

log = logging.getLogger(__name__)

SEND_TIMEOUT = 5.0  # seconds for an abort or ack: a dead broker must not delay the exit
_ACK_DELAY = 0.2  # seconds a result waits for its epoch to complete before an explicit ack


class Ack(NamedTuple):
    """What an ack needs of a result: never the result itself (a member's duplicates of a
    large result must not stay in memory until its ack is sent)."""

    sender: str
    id: str
    epoch: int


class Sending:
    """The aggregator's outgoing messages: kick-offs, control messages, acks."""

    # the aggregator's, used here
    participants: list[str]
    transport: Transport
    session: str
    run_id: str | None
    _withheld: set[str]

    def _init_sending(self) -> None:
        roster = self.transport.auth.roster if self.transport.auth is not None else None
        self._fanout = Fanout(self.participants, roster)  # broadcast or a copy each
        self._unacked: list[tuple[float, Ack]] = []  # (due, result) acks not sent yet
        self._late_acks: threading.Timer | None = None  # acks for a slow aggregate (see below)
        self._delivery: Delivery | None = None  # the kick-off until the broker accepted it all

    def _broadcast(self, kind: Kind, epoch: int, body: Any, *, confirm_later: bool = False) -> None:
        """To every participant; control bodies name this process (`session`), so a node
        can tell them from leftovers of an earlier aggregator process in its broker session.
        A kick-off is confirmed while the results come in (`confirm_later`), not before."""
        if self._late_acks is not None:
            self._late_acks.cancel()  # the kick-off (or end) acknowledges the results
            self._late_acks = None
        self._kickoff_accepted(wait=True)  # the previous one first
        listening = self._fanout.listeners(self._withheld)
        envelopes = [
            self._envelope(node, kind, epoch, body)
            for node in self.participants
            if node not in listening
        ]
        try:
            delivery = self.transport.dispatch(envelopes)
            if listening:
                everyone = self._envelope(EVERYONE, kind, epoch, body)
                delivery += self.transport.broadcast(everyone, listening)
            elif isinstance(body, dict) and self._fanout.probe_now(kind):
                # Nodes it reaches say so in their statuses; they act on nothing else in it, so
                # it carries no aggregate (a large one would not fit the one-frame probe).
                probe = {**{k: v for k, v in body.items() if k != "value"}, "probe": True}
                self.transport.probe_broadcast(self._envelope(EVERYONE, kind, epoch, probe))
        except TypeError as exc:
            raise RunFailed(f"the aggregate of epoch {epoch} cannot be sent: {exc}") from exc
        self._delivery = delivery
        if not confirm_later:
            self._kickoff_accepted(wait=True)

    def _kickoff_accepted(self, *, wait: bool) -> bool:
        """Whether the broker accepted the last broadcast for every node (TransportError naming
        one it refused or did not acknowledge in time); `wait` for it, or just look."""
        if self._delivery is None:
            return True
        try:
            if wait:
                self._delivery.wait()
            elif not self._delivery.check():
                return False
        except NotAcknowledged as exc:
            # Not a refusal: the broker is out of reach. paho keeps the messages queued and
            # sends them after a reconnect; the epoch deadline, not this wait, ends the run.
            log.warning("kick-off not acknowledged yet; the broker will deliver it: %s", exc)
        self._delivery = None
        return True

    def _envelope(self, node: str, kind: Kind, epoch: int, body: Any) -> Envelope:
        if kind in ("start", "aggregate", "finished", "abort") and isinstance(body, dict):
            body = {**body, "session": self.session}
            if node in self._withheld and kind in ("aggregate", "finished") and "value" in body:
                body = {**body, "value": None, "withheld": True}  # share_aggregate = false
        return Envelope(self.transport.analysis_id, self.transport.node_id, node, kind, epoch, body)

    def _send(
        self, node: str, kind: Kind, epoch: int, body: Any, timeout: float | None = None
    ) -> None:
        envelope = self._envelope(node, kind, epoch, body)
        try:
            self.transport.send(envelope, timeout)
        except TypeError as exc:
            raise RunFailed(f"the aggregate of epoch {epoch} cannot be sent: {exc}") from exc

    def _acknowledge_later(self, envelope: Envelope) -> bool:
        """Acknowledge this result unless the epoch completes first (its kick-off or the end
        of the run tells the node as much): a fast epoch costs no extra messages. True."""
        ack = Ack(envelope.sender, envelope.id, envelope.epoch)
        self._unacked.append((time.monotonic() + _ACK_DELAY, ack))
        return True

    def _acknowledge_if_slow(self) -> None:
        """The last results of an epoch are acknowledged by the next kick-off, unless
        aggregating takes longer than `_ACK_DELAY` (a secure sum's decryption takes minutes):
        then by an ack, so that nodes do not re-send their results meanwhile."""
        pending, self._unacked = [ack for _, ack in self._unacked], []
        if pending:
            self._late_acks = threading.Timer(_ACK_DELAY, self._acknowledge_all, (pending,))
            self._late_acks.daemon = True
            self._late_acks.start()

    def _acknowledge_all(self, acks: list[Ack]) -> None:
        try:
            for ack in acks:
                self._acknowledge(ack)
        except Exception as exc:  # a timer thread: the node's re-send gets an ack later
            log.warning("could not acknowledge results: %s", type(exc).__name__)

    def _send_acks(self) -> None:
        """The acks that are due: results that have waited `_ACK_DELAY` for their epoch."""
        now = time.monotonic()
        while self._unacked and self._unacked[0][0] <= now:
            self._acknowledge(self._unacked.pop(0)[1])

    def _acknowledge(self, result: Ack) -> bool:
        """Tell the node its result arrived (it re-sends until then); True, even if the ack
        cannot be sent now: the node's re-send will get another one."""
        body = {"ack": result.id, "epoch": result.epoch, "run": self.run_id}
        ack = Envelope(
            self.transport.analysis_id,
            self.transport.node_id,
            result.sender,
            "ack",
            result.epoch,
            body,
        )
        try:
            self.transport.post(ack)  # no wait for the broker: off the epoch's critical path
        except TransportError as exc:
            log.warning("could not acknowledge %s's result: %s", result.sender, exc)
        return True

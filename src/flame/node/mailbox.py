"""Buffered, de-duplicating receive over a transport.

Delivery is at least once, so every envelope id is processed once. A node often waits for one
kind of message while others arrive (a peer's free-form message during `analyze`, a status
while awaiting results); those are kept in order until someone asks for them.

A free-form message is acknowledged (its sender's `flame.context().send` waits for that); the
runtime's own request/reply traffic (categories under `RUNTIME_PREFIX`: secure-sum rounds,
endorsements, forwarded logs) is not. Nobody waits for those acks, the reply (or the next
round) is the answer, and each cost a signed envelope both ways: in a masked sum, half of
every round's envelopes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable

from flame.errors import TransportError
from flame.transport.base import Transport
from flame.utils.deadline import Deadline
from flame.wire.envelope import Envelope

log = logging.getLogger(__name__)

_SEEN_LIMIT = 100_000
_PENDING_LIMIT = 10_000
_POLL = 0.5
RUNTIME_PREFIX = "flame."  # node.context.RESERVED_PREFIX: analysts cannot send these


class Mailbox:
    """One node's view of its inbox."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._pending: deque[Envelope] = deque()
        self._seen: OrderedDict[str, None] = OrderedDict()

    def next(self, accept: Callable[[Envelope], bool], deadline: Deadline) -> Envelope | None:
        """The first envelope `accept` takes, buffered ones first; None at the deadline."""
        for envelope in self._pending:
            if accept(envelope):
                self._pending.remove(envelope)
                return envelope
        while True:
            received = self.transport.receive(min(deadline.left(), _POLL))
            if received is None:
                if deadline.passed():
                    return None
                continue
            envelope = received
            if not self._first_time(envelope):
                log.debug("%s ignored duplicate message %s", self.transport.node_id, envelope.id)
                continue
            if envelope.kind == "message" and not _runtime(envelope):
                self._acknowledge(envelope)
            if accept(envelope):
                return envelope
            if envelope.kind == "ack":
                continue  # nobody waits for it any more: its send() has timed out
            if len(self._pending) >= _PENDING_LIMIT:
                dropped = self._pending.popleft()
                log.warning("inbox buffer full; dropped a %s from %s", dropped.kind, dropped.sender)
            self._pending.append(envelope)

    def _first_time(self, envelope: Envelope) -> bool:
        if envelope.kind == "status":
            return True
        if envelope.id in self._seen:
            return False
        self._seen[envelope.id] = None
        if len(self._seen) > _SEEN_LIMIT:
            self._seen.popitem(last=False)
        return True

    def _acknowledge(self, envelope: Envelope) -> None:
        try:
            self.transport.send(envelope.reply("ack", {"ack": envelope.id}))
        except TransportError as exc:
            log.warning("could not acknowledge a message from %s: %s", envelope.sender, exc)


def _runtime(envelope: Envelope) -> bool:
    """The runtime's own traffic, never sent by `flame.context().send` (see the module)."""
    return isinstance(envelope.category, str) and envelope.category.startswith(RUNTIME_PREFIX)

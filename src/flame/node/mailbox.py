"""Buffered, de-duplicating receive over a transport.

Delivery is at least once, so every envelope id is processed once. A node often waits for one
kind of message while others arrive (a peer's free-form message during `analyze`, a status
while awaiting results); those are kept in order until someone asks for them.

A free-form message is acknowledged (its sender's `flame.context().send` waits for that); the
runtime's own request/reply traffic (categories under `RUNTIME_PREFIX`: secure-sum rounds,
endorsements, forwarded logs) is not. Nobody waits for those acks, the reply (or the next
round) is the answer, and each cost a signed envelope both ways: in a masked sum, half of
every round's envelopes.

What waits unasked is bounded per sender in bytes, not only in count: every roster member may
write to every inbox, so one member's burst of large signed messages must not pin memory in
an honest node or the aggregator. Free-form messages (`flame.context().send`) may pin 16 MiB
per sender; the runtime's own traffic (results, kick-offs, secure-sum rounds, which can be
large and are asked for soon) 256 MiB. Beyond its budget a sender's oldest waiting envelopes
of that class are dropped; the newest is always kept, so one large message is never refused.
The class is not the sender's word (its `kind` or a `flame.` category: a member runs its own
code): the runtime budget is only for what this node expects from that sender (at a node:
the aggregator's control messages and secure-sum requests; at the aggregator: results, error
reports, secure-sum replies and forwarded logs); the rest counts as free-form, and a message
of a `flame.` category no part of flame sends is dropped (a WARNING naming the sender). The
count limit is per sender too: one member's flood of small messages drops its own oldest,
never another sender's.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable

from flame.errors import TransportError
from flame.transport.base import Transport
from flame.utils.deadline import Deadline
from flame.wire.envelope import Envelope, encode_parts

log = logging.getLogger(__name__)

_SEEN_LIMIT = 100_000
_PENDING_LIMIT = 10_000  # unasked envelopes kept per sender
PENDING_BYTES_PER_SENDER = 16 << 20  # what one sender's unasked free-form messages may pin
PENDING_PROTOCOL_BYTES_PER_SENDER = 256 << 20  # and the rest of its unasked envelopes
_POLL = 0.5
RUNTIME_PREFIX = "flame."  # node.context.RESERVED_PREFIX: analysts cannot send these
# The runtime's categories (flame.secure.{decrypt,endorse,masking}, node.log_forward), here by
# value: the mailbox sits below those modules. Requests go from the aggregator to a node,
# replies and forwarded logs from a node to the aggregator.
_REQUESTS = frozenset({"flame.secure.decrypt", "flame.secure.endorse", "flame.secure.mask"})
_REPLIES = frozenset(
    {"flame.secure.decrypted", "flame.secure.endorsed", "flame.secure.masked", "flame.logs"}
)
_TO_NODE = frozenset({"start", "aggregate", "finished", "abort", "status", "ack"})
_TO_AGGREGATOR = frozenset({"result", "error", "status"})
_WARN_AGAIN = 60.0  # seconds: one warning per sender of unknown runtime categories per burst


class Mailbox:
    """One node's view of its inbox."""

    def __init__(self, transport: Transport, aggregator_id: str | None = None) -> None:
        self.transport = transport
        self.aggregator_id = aggregator_id  # whose runtime traffic this node expects (None: none)
        self._pending: deque[Envelope] = deque()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._held: defaultdict[str, int] = defaultdict(int)  # sender and class -> bytes pending
        self._sizes: dict[int, tuple[str, int]] = {}  # id() of a pending one -> class, bytes
        self._counts: Counter[str] = Counter()  # sender -> envelopes pending
        self._dropping: set[str] = set()  # over budget now (warned once per burst)
        self._unknown: dict[str, float] = {}  # sender -> when its unknown category was warned

    def next(self, accept: Callable[[Envelope], bool], deadline: Deadline) -> Envelope | None:
        """The first envelope `accept` takes, buffered ones first; None at the deadline."""
        for index, envelope in enumerate(self._pending):
            if accept(envelope):
                del self._pending[index]
                self._release(envelope)
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
            if envelope.kind == "message" and _runtime(envelope):
                if envelope.category not in _REQUESTS | _REPLIES:
                    self._warn_unknown(envelope)
                    continue
            elif envelope.kind == "message":
                self._acknowledge(envelope)
            if accept(envelope):
                return envelope
            if envelope.kind == "ack":
                continue  # nobody waits for it any more: its send() has timed out
            if self._counts[envelope.sender] >= _PENDING_LIMIT:
                self._drop_oldest_of(envelope.sender)
            self._keep(envelope)

    def _drop_oldest_of(self, sender: str) -> None:
        """The sender's own oldest waiting envelope goes: its flood never evicts another's."""
        for index, old in enumerate(self._pending):
            if old.sender == sender:
                del self._pending[index]
                self._release(old)
                if f"{sender}\0count" not in self._dropping:
                    self._dropping.add(f"{sender}\0count")
                    log.warning(
                        "%s sent more than %d messages not asked for yet; dropped its oldest",
                        sender,
                        _PENDING_LIMIT,
                    )
                return

    def _warn_unknown(self, envelope: Envelope) -> None:
        """A `flame.` category no part of flame sends: dropped, one WARNING per burst."""
        now = time.monotonic()
        if now - self._unknown.get(envelope.sender, -1e9) >= _WARN_AGAIN:
            log.warning(
                "dropped a message from %s of a runtime category flame does not send",
                envelope.sender,
            )
        self._unknown[envelope.sender] = now

    def _keep(self, envelope: Envelope) -> None:
        """Buffer an envelope nobody asked for yet, within its sender's byte budget for its
        class: beyond it, the sender's oldest waiting ones of that class go (one warning per
        burst, naming the sender)."""
        key, budget = self._budget(envelope)
        self._pending.append(envelope)
        size = envelope_size(envelope)
        self._sizes[id(envelope)] = (key, size)
        self._held[key] += size
        self._counts[envelope.sender] += 1
        if self._held[key] <= budget:
            return
        dropped, kept = 0, deque[Envelope]()
        for old in self._pending:  # the sender's oldest first; never the one just kept
            over = self._held[key] > budget
            if over and old is not envelope and self._sizes[id(old)][0] == key:
                self._release(old)
                dropped += 1
            else:
                kept.append(old)
        self._pending = kept
        if key not in self._dropping:
            self._dropping.add(key)
            log.warning(
                "%s sent more than %d MiB of messages not asked for yet; dropped its oldest "
                "waiting ones (%d now)",
                envelope.sender,
                budget >> 20,
                dropped,
            )

    def _release(self, envelope: Envelope) -> None:
        key, size = self._sizes.pop(id(envelope), (None, 0))
        if key is None:
            return
        self._held[key] -= size
        self._counts[envelope.sender] -= 1
        if self._counts[envelope.sender] <= 0:
            del self._counts[envelope.sender]
            self._dropping.discard(f"{envelope.sender}\0count")
        if self._held[key] <= 0:
            del self._held[key]
            self._dropping.discard(key)  # the burst is over: warn again next time

    def _budget(self, envelope: Envelope) -> tuple[str, int]:
        """The byte budget an unasked envelope counts against: its sender's, for its class
        (runtime only for what this node expects from that sender; see the module)."""
        if self._expected(envelope):
            return f"{envelope.sender}\0runtime", PENDING_PROTOCOL_BYTES_PER_SENDER
        return f"{envelope.sender}\0free", PENDING_BYTES_PER_SENDER

    def _expected(self, envelope: Envelope) -> bool:
        """Runtime traffic this node expects from the envelope's sender."""
        aggregator = self.aggregator_id
        if aggregator is None:
            return False
        message = envelope.kind == "message"
        if self.transport.node_id == aggregator:  # the nodes' results, reports and replies
            return envelope.category in _REPLIES if message else envelope.kind in _TO_AGGREGATOR
        if envelope.sender != aggregator:
            return False
        return envelope.category in _REQUESTS if message else envelope.kind in _TO_NODE

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


def envelope_size(envelope: Envelope) -> int:
    """Bytes of a message in flame's wire encoding (its arrays are not copied): as received
    when known, else encoded again."""
    if envelope.wire_bytes is not None:
        return envelope.wire_bytes
    try:
        return sum(memoryview(part).nbytes for part in encode_parts(envelope))
    except (TypeError, ValueError):
        return 0


def _runtime(envelope: Envelope) -> bool:
    """The runtime's own traffic, never sent by `flame.context().send` (see the module)."""
    return isinstance(envelope.category, str) and envelope.category.startswith(RUNTIME_PREFIX)

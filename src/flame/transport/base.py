"""The transport interface the federated layer talks to; it knows nothing of MQTT.

Semantics every implementation keeps (the broker's, so simulation behaves like production):
* each node has an inbox; `send` returns once the message is accepted for delivery
  (for MQTT: PUBACK) or raises `TransportError` naming the recipient;
* delivery is at least once and a node's inbox survives its reconnects (persistent session);
* every node has a retained status; a node that dies is marked `offline` (last will), and
  status changes of watched nodes arrive in the inbox as envelopes of kind `status`;
* `receive` decodes and validates; a malformed frame is logged and dropped, never raised.
"""

from __future__ import annotations

import abc
import hashlib
import itertools
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from flame.errors import NotAcknowledged, TransportError
from flame.transport.status_order import StatusOrder, gone
from flame.utils.deadline import Deadline
from flame.wire.envelope import DEFAULT_MAX_BYTES, Envelope, decode, encode_parts

if TYPE_CHECKING:
    from flame.identity.signing import Authenticator, Buffer

__all__ = ["Delivery", "Transport"]

log = logging.getLogger(__name__)
MAX_STATUS_BYTES = 64 * 1024
_VERIFIED_CACHE = 4096  # digests of whole signed statuses already verified (republished ones)


class _Accepting(Protocol):
    """A message on its way to the broker (`flame.clients.message_broker_client`)."""

    @property
    def acknowledged(self) -> bool: ...

    def wait(self, timeout: float) -> None: ...

    def abandon(self) -> None: ...


class Delivery:
    """Messages handed to the broker whose acceptance is confirmed later.

    Why: the aggregator's kick-off used to wait for every PUBACK before it listened for
    results, while the nodes were already answering; confirming while it collects keeps that
    broker round trip off the epoch. A refusal or a missed deadline is still an error naming
    the recipient, raised by `check` or `wait`."""

    def __init__(self, pending: Sequence[tuple[str, _Accepting]] = (), timeout: float = 0.0):
        self._pending = list(pending)
        self._deadline = Deadline(timeout)

    def __add__(self, other: Delivery) -> Delivery:
        joined = Delivery(self._pending + other._pending)
        # The deadline of a part with nothing pending (e.g. `Delivery()`, timeout 0) must not
        # make the other part's messages overdue at once.
        deadlines = [part._deadline for part in (self, other) if part._pending]
        joined._deadline = min(deadlines or [other._deadline], key=Deadline.left)
        return joined

    def check(self) -> bool:
        """True once every message is accepted; TransportError if one was refused or the
        deadline passed; False while some are still on their way."""
        while self._pending and self._pending[0][1].acknowledged:
            self._confirm(0.0)
        if self._pending and self._deadline.passed():
            self._confirm(0.0)  # raises: not acknowledged in time
        return not self._pending

    def wait(self) -> None:
        """Until every message is accepted; TransportError naming the first that was not."""
        while self._pending:
            self._confirm(self._deadline.left())

    def abandon(self) -> None:
        """Stop waiting (the broker may still deliver them)."""
        for _, publish in self._pending:
            publish.abandon()
        self._pending = []

    def _confirm(self, timeout: float) -> None:
        recipient, publish = self._pending[0]
        try:
            publish.wait(timeout)
        except TransportError as exc:
            self.abandon()
            kind = NotAcknowledged if isinstance(exc, NotAcknowledged) else TransportError
            raise kind(f"cannot send to {recipient!r}: {exc}") from None
        self._pending.pop(0)


class Transport(abc.ABC):
    """One node's connection to the federation."""

    keeps_sessions = True
    """Whether the broker keeps a node's queued messages for its next process (MQTT does);
    a node then drains its inbox before leaving."""

    def __init__(
        self, analysis_id: str, node_id: str, *, auth: Authenticator | None = None
    ) -> None:
        self.analysis_id = analysis_id
        self.node_id = node_id
        self.bytes_sent = 0  # frame bytes of envelopes sent / received: per-epoch metrics
        self.bytes_received = 0
        if auth is not None and auth.node_id != node_id:
            raise ValueError(f"the identity of {auth.node_id!r} cannot sign for {node_id!r}")
        self.auth = auth  # None: unsigned (an explicit opt-out; see flame.identity)
        self.instance = uuid.uuid4().hex  # this process's connection: in every status
        self.since = round(time.time(), 3)  # when it started: orders processes of a node
        # ... after the generation (status_order): one more than the node's status found on
        # the broker at connect, so a restart outranks its predecessor whatever the clocks say.
        self.generation = 0
        self._seq = itertools.count(1)  # every status it signs gets the next number
        self._verified: OrderedDict[bytes, None] = OrderedDict()  # see `_trusted_status`
        self.status_order = StatusOrder(self.since)  # which statuses of others are current
        self.stale_statuses = 0
        self.stale_by_node: dict[str, int] = {}  # for "missing" messages: ignored, not silent

    # --- signing: what every implementation sends and accepts ---------------------------------
    def use_auth(self, auth: Authenticator) -> None:
        """Sign and verify with `auth` from now on (set before `connect`)."""
        if auth.node_id != self.node_id:
            raise ValueError(f"the identity of {auth.node_id!r} cannot sign for {self.node_id!r}")
        self.auth = auth

    @property
    def rejected(self) -> int:
        """Messages and statuses dropped for a missing, foreign or bad signature."""
        return 0 if self.auth is None else self.auth.rejected

    def outgoing(self, envelope: Envelope) -> list[Buffer]:
        """The message for `envelope` as buffers: signed by this node, unless unsigned."""
        if self.auth is None:
            return list(encode_parts(envelope))
        return self.auth.seal_envelope(envelope)

    def incoming(self, frame: Buffer, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Envelope:
        """Verify (signed mode: before anything else), then decode; MessageError otherwise.

        Unsigned mode accepts plain frames, and signed ones without checking them (it has no
        roster): nothing is authenticated then."""
        if self.auth is not None:
            return self.auth.open(frame, max_bytes=max_bytes)
        from flame.identity.signing import SIGNED_MAGIC, unwrap_unverified

        if bytes(memoryview(frame)[:3]) == SIGNED_MAGIC:
            return decode(unwrap_unverified(frame), max_bytes=max_bytes)
        return decode(frame, max_bytes=max_bytes)

    def sign_status(self, status: dict[str, Any]) -> dict[str, Any]:
        """`status` bound to this process (instance id, start, sequence number, signing time;
        see `flame.transport.status_order`), signed (unless unsigned)."""
        status = {
            **status,
            "instance": self.instance,
            "since": self.since,
            "gen": self.generation,
            "seq": next(self._seq),
            "at": round(time.time(), 3),
        }
        if self.auth is None:
            return status
        return self.auth.sign_status(self.analysis_id, status)

    def offline_status(self) -> dict[str, Any]:
        """What the last will says: this instance went offline (signed when sent)."""
        return {"state": "offline"}

    def _trusted_status(self, node: str, status: dict[str, Any], payload: bytes) -> bool:
        """Whether `status` carries `node`'s valid signature: every status is checked before
        any field of it is used (a forged "routine" update once withheld a node's aggregates
        or blamed it for unapproved code). The only shortcut is a cache keyed by the SHA-256
        of the whole payload as signed and received, so a status republished unchanged (a
        reconnect, the retained copy again) is not verified twice; a changed byte is a new
        status."""
        assert self.auth is not None
        digest = hashlib.sha256(node.encode() + b"\0" + payload).digest()
        if digest in self._verified:
            self._verified.move_to_end(digest)
            return True
        if not self.auth.verify_status(self.analysis_id, node, status):
            return False
        self._verified[digest] = None
        while len(self._verified) > _VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return True

    def status_envelope(self, node: str, payload: bytes | bytearray) -> Envelope | None:
        """A watched node's retained status as an envelope, verified; None to drop it."""
        if len(payload) > MAX_STATUS_BYTES:
            log.warning("%s dropped a status of %d bytes from %s", self.node_id, len(payload), node)
            return None
        try:
            status = json.loads(payload)
        except (ValueError, RecursionError):
            status = None
        if not isinstance(status, dict):
            log.warning("%s dropped a status from %s that is not a JSON object", self.node_id, node)
            return None
        if self.auth is not None and not self._trusted_status(node, status, bytes(payload)):
            return None
        stale = self.status_order.check(node, status, signed=self.auth is not None)
        if stale is not None:
            self.stale_statuses += 1
            if node in self.stale_by_node or len(self.stale_by_node) < 10_000:
                self.stale_by_node[node] = self.stale_by_node.get(node, 0) + 1
            quiet = gone(status) and "conflict" not in status  # a departed process's goodbye
            (log.info if quiet else log.warning)(
                "%s ignored a stale status of %s (state %r): %s",
                self.node_id,
                node,
                str(status.get("state"))[:32],
                stale,
            )
            return None
        status.pop("sig", None)
        return Envelope(
            self.analysis_id, node, self.node_id, "status", epoch=-1, body=status, signed=payload
        )

    @abc.abstractmethod
    def connect(self, status: dict[str, Any]) -> None:
        """Join: register the last will, then publish `status` as this node's retained state."""

    @abc.abstractmethod
    def close(self) -> None:
        """Leave cleanly and release the connection. The retained status left behind keeps a
        final state (`done`/`failed`, marked `"online": false`); any other becomes `offline`."""

    @abc.abstractmethod
    def send(self, envelope: Envelope, timeout: float | None = None) -> None:
        """Put `envelope` into its recipient's inbox; block until accepted or raise."""

    @abc.abstractmethod
    def receive(self, timeout: float) -> Envelope | None:
        """The next valid envelope for this node, or None when `timeout` seconds pass."""

    @abc.abstractmethod
    def announce(self, status: dict[str, Any]) -> None:
        """Replace this node's retained status (e.g. `{"state": "computing", "epoch": 2}`)."""

    @abc.abstractmethod
    def watch(self, nodes: Iterable[str] | None = None) -> None:
        """Deliver status changes of these nodes (all when None) as `status` envelopes."""

    def send_all(self, envelopes: Sequence[Envelope], timeout: float | None = None) -> None:
        """`send` each envelope; raise on the first one not accepted. Implementations may
        overlap the waits (MQTT: every PUBACK awaited together, one broker round trip for a
        whole broadcast instead of one per recipient)."""
        self.dispatch(envelopes, timeout).wait()

    def dispatch(self, envelopes: Sequence[Envelope], timeout: float | None = None) -> Delivery:
        """Hand every envelope to the broker; their acceptance (within `timeout`) is confirmed
        through the returned Delivery. Implementations without acknowledgements send here."""
        for envelope in envelopes:
            self.send(envelope, timeout)
        return Delivery()

    def take_broadcasts(self) -> None:
        """Before `connect`: also receive the aggregator's broadcasts (`EVERYONE`), where the
        transport has them; once one has arrived, its statuses say `"broadcast": true` (see
        `broadcast`)."""
        return None  # this transport has no broadcasts: every message comes to the inbox

    def probe_broadcast(self, envelope: Envelope) -> None:
        """Publish `envelope` on the broadcast topic without confirming it: nodes that receive
        it learn that broadcasts reach them and say so. No-op without a broadcast topic."""
        return None

    def broadcast(
        self, envelope: Envelope, recipients: Sequence[str], timeout: float | None = None
    ) -> Delivery:
        """`envelope` to each of `recipients`, which all said `"broadcast": true`: once on
        the run's broadcast topic where the transport has one (signed once, one publish for
        any number of nodes), else one copy per recipient."""
        copies = [replace(envelope, recipient=node) for node in recipients]
        return self.dispatch(copies, timeout)

    def post(self, envelope: Envelope) -> None:
        """Send without waiting for the broker to accept it, for small best-effort messages
        on a hot path (the aggregator's result acks: a lost one only costs a re-send)."""
        self.send(envelope)

    @property
    def link(self) -> int:
        """How many times the broker lost this node's session (restart without persistence):
        messages queued for the node then are gone, so unacknowledged ones must be re-sent."""
        return 0

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

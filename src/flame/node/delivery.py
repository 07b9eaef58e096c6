"""A node's result, delivered end to end, and its forwarded log lines.

Why apart from the epoch loop: a result counts once the aggregator acknowledges it (an `ack`
envelope), not when the broker has it. Until then the node re-sends it: at once after the
broker lost this node's session, else on a backing-off timer (doubling up to two minutes,
back to the configured interval when the aggregator returns). A broker out of reach does not
fail the epoch: only the aggregator's epoch deadline (its abort, or this node's wait for the
next instruction) ends the run. Log lines the policy forwards go out between protocol steps,
best effort.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

from flame.errors import NotAcknowledged, TransportError
from flame.node.log_forward import LOG_CATEGORY, LogForwarder
from flame.transport.base import Transport
from flame.wire.envelope import Envelope

__all__ = ["GOODBYE_TIMEOUT", "Delivery"]

log = logging.getLogger(__name__)

_MAX_RESEND_INTERVAL = 120.0
GOODBYE_TIMEOUT = 5.0  # seconds for a last report or a re-send: never stall on a dead broker


class Delivery:
    """The last result sent, re-sent until acknowledged; log lines forwarded (see the module)."""

    def __init__(
        self,
        transport: Transport,
        aggregator_id: str,
        resend_interval: float,
        epoch: Callable[[], int],
    ) -> None:
        self.transport = transport
        self.aggregator_id = aggregator_id
        self.resend_interval = resend_interval
        self._epoch = epoch  # the epoch computing now, for forwarded log lines
        self.forwarder: LogForwarder | None = None  # set while a run forwards its logs
        self.last_epoch = -1
        self.last_sent: Envelope | None = None
        self.acked = True
        self.resend_every = resend_interval
        self.resend_at = 0.0
        self.link = 0  # the transport's link when last checked: another one lost the session

    def send(self, envelope: Envelope) -> None:
        """Send a result; it is re-sent until acknowledged."""
        epoch = envelope.epoch
        self.last_epoch = epoch
        self.last_sent = envelope
        self.acked = False
        self.resend_every = self.resend_interval
        try:
            self.transport.send(envelope)
        except NotAcknowledged as exc:
            # Not a refusal: the broker is out of reach (a partition, a slow uplink). The
            # result is kept and re-sent with backoff; only the aggregator's epoch deadline
            # (its abort, or this node's wait for the next instruction) ends the run.
            log.warning(
                "epoch %d: result not acknowledged yet, keeping it and re-sending: %s", epoch, exc
            )
        self.resend_at = time.monotonic() + self.resend_every

    def forget(self) -> None:
        """The run this node sent for was left: nothing of it is re-sent."""
        self.last_epoch = -1
        self.last_sent = None
        self.acked = True

    def hurry(self) -> None:
        """The aggregator is back (partition over, or restarted): re-send at once, not when
        the backed-off timer next fires."""
        self.resend_every = self.resend_interval
        self.resend_at = 0.0

    def forward_logs(self) -> None:
        """This node's collected log lines to the aggregator (policy `forward_logs`)."""
        if self.forwarder is None:
            return
        lines = self.forwarder.take()
        if not lines:
            return
        envelope = Envelope(
            self.transport.analysis_id,
            self.transport.node_id,
            self.aggregator_id,
            "message",
            max(self._epoch(), 0),
            {"lines": lines},
            LOG_CATEGORY,
        )
        try:
            self.transport.send(envelope, GOODBYE_TIMEOUT)
        except Exception as exc:  # forwarding is best effort
            log.debug("could not forward %d log lines: %s", len(lines), exc)

    def keep_delivering(self) -> None:
        """Re-send the unacknowledged result: at once after a lost session, else on a timer."""
        self.forward_logs()
        if self.acked or self.last_sent is None:
            return
        link = self.transport.link
        if link != self.link:
            self.link = link
            self.resend("the broker lost this node's session")
        elif time.monotonic() >= self.resend_at:
            self.resend(f"not acknowledged within {self.resend_every:g} s")
            self.resend_every = min(self.resend_every * 2, _MAX_RESEND_INTERVAL)
        else:
            return
        self.resend_at = time.monotonic() + self.resend_every

    def resend(self, why: str) -> None:
        assert self.last_sent is not None
        log.info("re-sending the result of epoch %d (%s)", self.last_sent.epoch, why)
        again = replace(self.last_sent, id=uuid.uuid4().hex, sent=time.time())
        try:
            self.transport.send(again, GOODBYE_TIMEOUT)
        except TransportError as exc:
            log.warning("could not re-send the result of epoch %d: %s", again.epoch, exc)

    def rebind(self, run: str) -> None:
        """The last result again, under run id `run` (a new aggregator process asked for it):
        a fresh id and signature; re-sent until that process acknowledges it."""
        assert self.last_sent is not None
        self.last_sent = replace(self.last_sent, category=run)
        self.acked = False
        self.hurry()
        self.resend(f"the aggregator asked for it as run {run}")
        self.resend_at = time.monotonic() + self.resend_every

    def note_ack(self, envelope: Envelope, run: str | None) -> None:
        """An `ack` of the aggregator: the result of its epoch (in run `run`) has arrived."""
        body = envelope.body if isinstance(envelope.body, dict) else {}
        if (
            self.last_sent is not None
            and body.get("epoch") == self.last_sent.epoch
            and body.get("run") in (None, run)
        ):
            self.acked = True

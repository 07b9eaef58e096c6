"""Which aggregator process a node follows: its retained status, its session, its last will.

Why apart from the epoch loop: the node acts on one aggregator process at a time, known from
its verified status. Its `failed` status stops the node even if the abort is lost; its last
will (offline) makes the node wait, and its return makes it re-send at once; two processes
at once stop the run. A persistent broker session can hold a control message of an earlier
process of the same analysis id: it is dropped, and one arriving before the live process is
known waits (parked) until it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flame.aggregator.membership import Instances
from flame.node.instructions import CONTROL, Instruction
from flame.node.run_end import ends_this_run
from flame.secure.endorse import ENDORSE
from flame.secure.fields import DECRYPT
from flame.secure.masking import MASK
from flame.wire.envelope import Envelope

__all__ = ["AggregatorWatch"]

log = logging.getLogger(__name__)


class AggregatorWatch:
    """The aggregator's live process as this node sees it (see the module)."""

    def __init__(self, aggregator_id: str, on_back: Callable[[], None]) -> None:
        self.aggregator_id = aggregator_id
        self._on_back = on_back  # the aggregator is back after its last will
        self.instances = Instances()  # the aggregator's process: two at once stop the run
        self.away = False  # its last will said offline; cleared by its next status
        self.session: str | None = None  # the live aggregator process
        self.last: dict[str, Any] = {}  # its latest verified status
        self.parked: list[Envelope] = []

    def from_aggregator(self, envelope: Envelope) -> bool:
        """What a node reads from the aggregator: control, status, acks, secure-sum rounds."""
        return envelope.sender == self.aggregator_id and (
            envelope.kind in CONTROL
            or envelope.kind in ("status", "ack")
            or (envelope.kind == "message" and envelope.category in (DECRYPT, ENDORSE, MASK))
        )

    def is_stop(self, envelope: Envelope) -> bool:
        """What may stop an epoch being computed: an abort, the end, a status."""
        return envelope.sender == self.aggregator_id and envelope.kind in (
            "abort",
            "finished",
            "status",
        )

    def note_status(self, envelope: Envelope) -> Instruction | None:
        """Track the aggregator's process; its `failed` status stops us even if the abort is
        lost. A stale status of an earlier aggregator process (other session) is not acted on."""
        body = envelope.body if isinstance(envelope.body, dict) else {}
        problem = self.instances.note(self.aggregator_id, body)
        if problem is not None:
            return Instruction("abort", -1, reason=problem)
        state = body.get("state")
        session = body.get("session")
        self.last = body
        if state == "offline" or (body.get("online") is False and state not in ("failed",)):
            log.warning("aggregator %s is offline; waiting for it", self.aggregator_id)
            self.away = True
            return None
        if self.away:  # back (partition over, or restarted): re-send at once,
            self.away = False  # not when the backed-off timer next fires
            self._on_back()
        if state == "failed":
            if session is not None and session == self.session:
                epoch = body.get("epoch")
                return Instruction(
                    "abort",
                    epoch if isinstance(epoch, int) else -1,
                    reason=str(body.get("reason") or "the aggregator failed")[:2000],
                )
            return None
        if state == "done" or not isinstance(session, str):
            return None
        if session != self.session and self.session is not None:
            log.info("aggregator %s restarted (new process)", self.aggregator_id)
        self.session = session
        return None

    def from_current(self, envelope: Envelope, code: str | None) -> bool:
        """Whether a control message comes from the aggregator process running now.

        A persistent broker session can hold an abort or kick-off of an earlier run of this
        analysis id (an aggregator process that is gone). Each names its process session;
        one from another process than the live one is dropped. Until the live one is known
        (its retained status arrives right after connecting), messages wait here.
        """
        body = envelope.body if isinstance(envelope.body, dict) else {}
        session = body.get("session")
        if not isinstance(session, str):
            return True
        if self.session is None:
            last = self.last
            if (
                envelope.kind == "finished"
                and last.get("state") == "done"
                and session == last.get("session")
                and ends_this_run(last, body, code)
            ):
                return True  # the run ended before this node joined: take its result
            self.parked.append(envelope)
            return False
        if session == self.session:
            return True
        log.info("ignored a %s from an earlier aggregator process", envelope.kind)
        return False

    def unparked(self) -> Envelope | None:
        """A parked control message, once the live aggregator process is known."""
        if self.parked and self.session is not None:
            return self.parked.pop(0)
        return None

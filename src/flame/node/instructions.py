"""What the aggregator tells a node, read into `Instruction`s, and which of them are new.

Why apart from the epoch loop: acting on a kick-off once is bookkeeping of its own. Every
kick-off names a run id; a `start` under a new run id (an aggregator that restarted without
storage) makes the node start over, and nothing of a run it left is acted on again. A kick-off
of an epoch already sent is not computed again: the epoch just sent is re-sent instead (a
restarted aggregator may have lost it). A `start` of epoch 0 under a new run id while this
node's epoch-0 result waits is answered with that result again, under the new run id (a new
aggregator process names a run of its own, so a result of an earlier process never counts;
under masking the result is bound to its run, so it is computed again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flame.node.delivery import Delivery
from flame.node.run_end import ends_this_run
from flame.wire.envelope import Envelope

__all__ = ["CONTROL", "NOT_PARTICIPANT", "Instruction", "InstructionReader", "read_instruction"]

log = logging.getLogger(__name__)

CONTROL = ("start", "aggregate", "finished", "abort")
NOT_PARTICIPANT = "not_participant"  # an abort's code: this node is not in the run's roster


@dataclass(frozen=True)
class Instruction:
    """What the aggregator told this node to do next."""

    kind: str
    epoch: int
    previous: Any = None
    value: Any = None
    converged: bool = False
    location: str | None = None
    reason: str = ""
    run: str | None = None
    code: str = ""
    withheld: bool = False
    """The aggregator sent no aggregate (it believes this node's policy declines them)."""


def read_instruction(envelope: Envelope, code: str | None) -> Instruction | None:
    """The instruction a control message carries; None for a `finished` of other code or
    another run (see run_end) and for what is no instruction."""
    body = envelope.body if isinstance(envelope.body, dict) else {}
    run = body.get("run") if isinstance(body.get("run"), str) else None
    if envelope.kind == "start":
        return Instruction("start", envelope.epoch, previous=body.get("previous"), run=run)
    if envelope.kind == "aggregate":
        return Instruction(
            "aggregate",
            envelope.epoch + 1,
            previous=body.get("value"),
            value=body.get("value"),
            converged=bool(body.get("converged", False)),
            run=run,
            withheld=body.get("withheld") is True,
        )
    if envelope.kind == "finished":
        if not ends_this_run(None, body, code):
            return None
        location = body.get("location")
        return Instruction(
            "finished",
            envelope.epoch,
            value=body.get("value"),
            converged=bool(body.get("converged", False)),
            location=location if isinstance(location, str) else None,
            run=run,
            withheld=body.get("withheld") is True,
        )
    if envelope.kind == "abort":
        abort_code = body.get("code")
        return Instruction(
            "abort",
            envelope.epoch,
            reason=str(body.get("reason", "aborted"))[:2000],
            run=run,
            code=abort_code if isinstance(abort_code, str) else "",
        )
    return None


class InstructionReader:
    """The run this node is in, the runs it left, and which instructions are new for it."""

    def __init__(self, delivery: Delivery, *, rebind: bool = True) -> None:
        self.delivery = delivery  # the epoch last sent, forgotten when the run starts over
        self.run: str | None = None
        self.left_runs: set[str] = set()
        self.rebind = rebind  # an epoch-0 result may be sent again under a new run id
        self.rebound: str | None = None  # the run to send it again under (the runtime does)

    def admit(self, envelope: Envelope, code: str | None) -> Instruction | None:
        """The instruction in `envelope` if it is new for this node, after run-id bookkeeping."""
        if isinstance(envelope.body, dict) and envelope.body.get("probe") is True:
            return None  # the aggregator asking whether broadcasts reach us: the transport noted it
        instruction = read_instruction(envelope, code)
        if instruction is None:
            return None
        delivery = self.delivery
        run = instruction.run
        if run is not None and run != self.run:
            if run in self.left_runs:
                log.info("ignored a %s of run %s, which this node left", instruction.kind, run)
                return None
            if instruction.kind in ("start", "aggregate"):
                if self.run is not None and self._answered_start(instruction):
                    log.info(
                        "a new aggregator process asks for epoch 0 as run %s (this node was in "
                        "run %s): sending its result again under it",
                        run,
                        self.run,
                    )
                    self.left_runs.add(self.run)
                    self.run = self.rebound = run
                    return None
                if self.run is not None:
                    log.warning(
                        "the aggregator started run %s over (this node was in run %s, epoch "
                        "%d); computing again from epoch %d",
                        run,
                        self.run,
                        delivery.last_epoch,
                        instruction.epoch,
                    )
                    self.left_runs.add(self.run)
                    delivery.forget()
                self.run = run
        if instruction.kind in ("start", "aggregate") and instruction.epoch <= delivery.last_epoch:
            if instruction.epoch == delivery.last_epoch and delivery.last_sent is not None:
                # A restarted aggregator may have lost it: send again, never recompute.
                delivery.resend("the aggregator asked for this epoch again")
            return None
        return instruction

    def _answered_start(self, instruction: Instruction) -> bool:
        """A `start` of epoch 0 while this node's epoch-0 result is the one it last sent."""
        delivery = self.delivery
        return (
            self.rebind
            and instruction.kind == "start"
            and instruction.epoch == 0
            and delivery.last_epoch == 0
            and delivery.last_sent is not None
        )

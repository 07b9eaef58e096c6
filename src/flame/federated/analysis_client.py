"""The analysis node: wait for the aggregator's word, analyze, send, repeat until finished.

The aggregator drives the epochs: `start` (epoch 0, or a resume), `aggregate` (epoch e done,
compute e+1), `finished` or `abort`. A node that restarts simply waits; the aggregator sees
its new session and sends it the current epoch again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flame import _logging
from flame._deadline import Deadline
from flame._redact import describe_exception
from flame.errors import RunFailed, RunTimeout
from flame.federated.context import Context
from flame.federated.functions import AnalysisFunctions
from flame.federated.mailbox import Mailbox
from flame.federated.secure import DECRYPT, DECRYPTED, SecureKeys, answer_decrypt, seal
from flame.isolation.runner import ChildRunner, InProcessRunner, Runner
from flame.messages import Envelope
from flame.transport.base import Transport

__all__ = ["AnalysisClient", "Instruction"]

log = logging.getLogger(__name__)

_CONTROL = ("start", "aggregate", "finished", "abort")


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


class AnalysisClient:
    """One analysis node's side of the star protocol."""

    def __init__(
        self,
        transport: Transport,
        *,
        aggregator_id: str,
        participants: Sequence[str] = (),
        wait_timeout: float = 900.0,
        seed: int | None = None,
        state: Any = None,
        secrets: Sequence[str] = (),
        keys: SecureKeys | None = None,
        isolate: bool = False,
    ) -> None:
        self.transport = transport
        self.mailbox = Mailbox(transport)
        self.aggregator_id = aggregator_id
        self.wait_timeout = wait_timeout
        self.session = uuid.uuid4().hex
        self.secrets = list(secrets)
        self.keys = keys
        self._specs: dict[str, Any] = {}  # field -> the encoding this node sealed it with
        self.context = Context(
            analysis_id=transport.analysis_id,
            node_id=transport.node_id,
            role="analysis",
            participants=list(participants),
            aggregator_id=aggregator_id,
            mailbox=self.mailbox,
            seed=seed,
            state=state,
            on_progress=self._report_progress,
        )
        self.isolate = isolate
        self._last_epoch = -1
        self._last_sent: Envelope | None = None
        self._epoch_started = time.perf_counter()

    # --- the protocol steps ------------------------------------------------------------------
    def connect(self) -> None:
        self.transport.connect(self._status("waiting"))
        self.transport.watch([self.aggregator_id])

    def await_instruction(self) -> Instruction:
        """The next new instruction from the aggregator; duplicates and old epochs are skipped."""
        deadline = Deadline(self.wait_timeout)
        while True:
            envelope = self.mailbox.next(self._from_aggregator, deadline)
            if envelope is None:
                raise RunTimeout(
                    f"node {self.transport.node_id!r} heard nothing from aggregator "
                    f"{self.aggregator_id!r} within {self.wait_timeout:g} s"
                )
            if envelope.kind == "message":
                self._answer_decrypt(envelope)
                continue
            if envelope.kind == "status":
                state = envelope.body.get("state") if isinstance(envelope.body, dict) else None
                if state == "offline":
                    log.warning("aggregator %s is offline; waiting for it", self.aggregator_id)
                continue
            instruction = self._parse(envelope)
            if instruction is None:
                continue
            if instruction.kind in ("start", "aggregate") and instruction.epoch <= self._last_epoch:
                if instruction.epoch == self._last_epoch and self._last_sent is not None:
                    # A restarted aggregator may have lost it: send again, never recompute.
                    log.info("resending the result of epoch %d", instruction.epoch)
                    self.transport.send(self._last_sent)
                continue
            return instruction

    def send_results(self, epoch: int, result: Any) -> None:
        """Send this epoch's result to the aggregator (returns once the broker has it)."""
        self._specs = {}
        origin = (self.transport.analysis_id, epoch, self.transport.node_id)
        body = seal(result, self.keys, self._specs, origin)
        envelope = Envelope(
            self.transport.analysis_id,
            self.transport.node_id,
            self.aggregator_id,
            "result",
            epoch,
            body,
        )
        self.transport.send(envelope)
        self._last_epoch = epoch
        self._last_sent = envelope
        self.transport.announce(self._status("sent", epoch, **self._metrics()))

    def await_aggregation(self) -> Instruction:
        """Wait for the aggregate of the epoch just sent (or the final result / an abort)."""
        return self.await_instruction()

    def report_failure(self, epoch: int, exc: BaseException) -> str:
        """Tell the aggregator this node failed; returns the (secret-free) reason sent."""
        reason = describe_exception(exc, self.secrets)
        body = {"node": self.transport.node_id, "epoch": epoch, "error": reason}
        try:
            self.transport.send(
                Envelope(
                    self.transport.analysis_id,
                    self.transport.node_id,
                    self.aggregator_id,
                    "error",
                    epoch,
                    body,
                )
            )
            self.transport.announce(self._status("failed", epoch, reason=reason))
        except Exception as send_exc:  # the failure report must not mask the failure
            log.error("could not report the failure to the aggregator: %s", send_exc)
        return reason

    # --- the whole run -----------------------------------------------------------------------
    def run(self, functions: AnalysisFunctions, data: Any) -> Instruction:
        """Play this node's part until the aggregator says finished; returns that instruction."""
        self.connect()
        runner = self._runner(functions, data)
        try:
            try:
                runner.start()  # the child starts while the aggregator gathers the nodes
            except Exception as exc:  # tried again, and reported, in the first epoch
                log.warning("the analysis could not be started yet: %s", exc)
            while True:
                instruction = self.await_instruction()
                if instruction.kind == "abort":
                    raise RunFailed(instruction.reason, epoch=instruction.epoch)
                if instruction.kind == "finished":
                    self.transport.announce(self._status("done", instruction.epoch))
                    return instruction
                epoch = instruction.epoch
                self.transport.announce(self._status("computing", epoch))
                self.context.epoch = epoch
                self.context._progress = 0.0
                _logging.set_epoch(epoch)
                started = self._epoch_started = time.perf_counter()
                try:
                    outcome = runner.run(epoch, instruction.previous)
                    self.send_results(epoch, outcome.result)
                except RunFailed:
                    raise
                except (Exception, SystemExit, KeyboardInterrupt) as exc:
                    reason = self.report_failure(epoch, exc)
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    raise RunFailed(
                        f"node {self.transport.node_id!r} failed in epoch {epoch}: {reason}",
                        node=self.transport.node_id,
                        epoch=epoch,
                    ) from exc
                log.debug("epoch %d: result sent in %.3f s", epoch, time.perf_counter() - started)
        finally:
            _logging.set_epoch(None)
            runner.close()
            self.transport.close()

    # --- helpers -----------------------------------------------------------------------------
    def _runner(self, functions: AnalysisFunctions, data: Any) -> Runner:
        """Where `analyze` runs: an isolated child (nodes, CLI) or this process (Python API)."""
        if self.isolate:
            return ChildRunner(functions.analyze, data, self.context, timeout=self.wait_timeout)
        return InProcessRunner(functions.analyze, data, self.context)

    def _from_aggregator(self, envelope: Envelope) -> bool:
        return envelope.sender == self.aggregator_id and (
            envelope.kind in _CONTROL
            or envelope.kind == "status"
            or (envelope.kind == "message" and envelope.category == DECRYPT)
        )

    def _answer_decrypt(self, envelope: Envelope) -> None:
        if self.keys is not None and self.keys.share is not None:
            reply: dict[str, Any] = self.keys.party().answer(envelope)
        elif self.keys is None or self.keys.private_key is None:
            reply = {"error": "this node has no private key to decrypt with"}
        elif envelope.epoch != self._last_epoch:
            reply = {"error": f"no result of this node in epoch {envelope.epoch}"}
        else:
            reply = answer_decrypt(envelope, self.keys, self.transport.node_id, self._specs)
        answer = envelope.reply("message", reply, category=DECRYPTED)
        self.transport.send(answer)

    def _parse(self, envelope: Envelope) -> Instruction | None:
        body = envelope.body if isinstance(envelope.body, dict) else {}
        if envelope.kind == "start":
            return Instruction("start", envelope.epoch, previous=body.get("previous"))
        if envelope.kind == "aggregate":
            return Instruction(
                "aggregate",
                envelope.epoch + 1,
                previous=body.get("value"),
                value=body.get("value"),
                converged=bool(body.get("converged", False)),
            )
        if envelope.kind == "finished":
            location = body.get("location")
            return Instruction(
                "finished",
                envelope.epoch,
                value=body.get("value"),
                converged=bool(body.get("converged", False)),
                location=location if isinstance(location, str) else None,
            )
        if envelope.kind == "abort":
            return Instruction("abort", envelope.epoch, reason=str(body.get("reason", "aborted")))
        return None

    def _status(self, state: str, epoch: int = -1, **extra: Any) -> dict[str, Any]:
        status = {
            "state": state,
            "role": "analysis",
            "session": self.session,
            "epoch": epoch,
            "time": time.time(),
            **extra,
        }
        if state == "computing":
            status.setdefault("progress", 0.0)
        return status

    def _metrics(self) -> dict[str, Any]:
        """Per-epoch figures for `flame status`: compute time and traffic so far."""
        return {
            "duration_s": round(time.perf_counter() - self._epoch_started, 6),
            "bytes_sent": self.transport.bytes_sent,
            "bytes_received": self.transport.bytes_received,
        }

    def _report_progress(self, fraction: float) -> None:
        try:
            self.transport.announce(
                self._status("computing", self.context.epoch, progress=round(fraction, 4))
            )
        except Exception as exc:  # progress is best effort
            log.debug("progress not published: %s", exc)

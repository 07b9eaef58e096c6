"""The analysis node: wait for the aggregator's word, analyze, send, repeat until finished.

The aggregator drives the epochs: `start` (epoch 0, or a resume), `aggregate` (epoch e done,
compute e+1), `finished` or `abort`. A node that restarts simply waits; the aggregator sees
its new session and sends it the current epoch again.

This module is the epoch loop; its jobs live beside it: `instructions` (which kick-offs are
new, run ids), `aggregator_watch` (the aggregator's live process and status), `compute`
(where `analyze` runs), `secure_answers` (secure fields sealed, the aggregator's requests
answered), `delivery` (a result counts once the aggregator acknowledges it; re-sent until
then) and `failure` (whatever stops the node other than `finished` is announced: an error
report to the aggregator and a `failed` status with the reason).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from flame.analysis.functions import AnalysisFunctions
from flame.data.versions import DataVersions
from flame.errors import ConfigError, RunFailed, RunTimeout, stop_signal
from flame.isolation.runner import Runner
from flame.node.aggregator_watch import AggregatorWatch
from flame.node.compute import Interrupted, analyze_epoch, make_runner, stop_at_once
from flame.node.context import Context
from flame.node.delivery import Delivery
from flame.node.failure import FailureReports
from flame.node.instructions import NOT_PARTICIPANT, Instruction, InstructionReader
from flame.node.log_forward import LogForwarder
from flame.node.mailbox import Mailbox
from flame.node.secure_answers import SecureAnswers
from flame.node.status_board import StatusBoard
from flame.privacy.disclosure import wrap_release
from flame.privacy.policy import NodePolicy
from flame.privacy.quoting import quoted_may_leave
from flame.privacy.release import Gate
from flame.secure.fields import SecureKeys
from flame.secure.masking import MaskingNode, MaskingSettings
from flame.transport.base import Transport
from flame.utils import logs as _logging
from flame.utils.deadline import Deadline
from flame.wire.envelope import Envelope

__all__ = ["NOT_PARTICIPANT", "AnalysisClient", "Instruction"]


def _notable(privacy: dict[str, Any] | None) -> bool:
    """Whether a release's privacy report says anything (a spend, suppressed cells or
    messages let out): only then is it attached to the result and kept in the status."""
    if privacy is None:
        return False
    spend = privacy.get("spend") or {}
    return (
        bool(spend.get("epsilon") or spend.get("delta") or privacy.get("suppressed"))
        or "messages" in privacy
    )


log = logging.getLogger(__name__)

_TICK = 1.0  # seconds between checks for re-sends while waiting


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
        resend_interval: float = 10.0,
        log_traceback: bool = True,
        isolate: bool = False,
        pooled: bool = False,
        policy: NodePolicy | None = None,
        hide: Sequence[str | Path] = (),
        code: str | None = None,
        masking: MaskingSettings | None = None,
    ) -> None:
        self.transport = transport
        self.mailbox = Mailbox(transport, aggregator_id)
        self.aggregator_id = aggregator_id
        self.wait_timeout = wait_timeout
        self.session = uuid.uuid4().hex
        self.secrets = list(secrets)
        self.keys = keys
        masking_node = None  # FLAME_SECURE__SCHEME=masking: flame.secure.masking
        if masking is not None:
            masking_node = MaskingNode(
                masking,
                transport.analysis_id,
                transport.node_id,
                participants,
                aggregator_id,
                transport.auth,
                state,
            )
        self.log_traceback = log_traceback  # off where the aggregator logs to the same place
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
        self.policy = policy if policy is not None else NodePolicy()
        # flame's error texts quoting the node's data leave only if the policy says so
        self.quoted_data_leaves = quoted_may_leave(self.policy)
        self.isolate = isolate
        self.pooled = pooled  # isolated children forked per epoch from a fork server
        self._rows_read: Callable[[], int] = lambda: 0  # rows analyze was served this epoch
        self.hide = list(hide)  # node paths the isolated analysis may not open
        self.gate = Gate(
            self.policy,
            node_id=transport.node_id,
            analysis_id=transport.analysis_id,
            min_contributors=None if keys is None else keys.min_contributors,
        )
        self._privacy: dict[str, Any] = {}  # per epoch: DP spend, suppressed cells
        self._secure = SecureAnswers(keys, transport, lambda: self.context._state, masking_node)
        self.code = code  # SHA-256 of the analysis code, announced for the aggregator to compare
        self.delivery = Delivery(
            transport, aggregator_id, resend_interval, lambda: self.context.epoch
        )
        self.watch = AggregatorWatch(aggregator_id, on_back=self.delivery.hurry)
        # under masking a result is bound to its run id: never sent again under another one
        self.instructions = InstructionReader(self.delivery, rebind=masking_node is None)
        self._epoch_started = time.perf_counter()
        self.board = StatusBoard(transport)  # routine statuses kept off the critical path
        self.failures = FailureReports(
            transport,
            aggregator_id,
            self.session,
            self.board,
            self._status,
            self.delivery.forward_logs,
        )
        self._versions: DataVersions | None = None

    # --- the protocol steps ------------------------------------------------------------------
    def connect(self) -> None:
        self._secure.start()
        if self.policy.share_aggregate:  # the kick-offs everyone gets, with the aggregate
            self.transport.take_broadcasts()
        self.transport.connect(self._status("waiting"))
        self.delivery.link = self.transport.link
        self.transport.watch([self.aggregator_id])

    def await_instruction(self) -> Instruction:
        """The next instruction from the aggregator; duplicates, old epochs and runs skipped.

        When several kick-offs are queued (a slow node under a quorum), only the newest counts,
        and a queued `finished` or `abort` wins over any kick-off: a finished run is not
        worked through epoch by epoch. One queued before the node moved to another run (a new
        aggregator process's `start`) is dropped: it would answer the new run from the old
        run's aggregate.
        """
        deadline = Deadline(self.wait_timeout)
        chosen: Instruction | None = None
        while True:
            self.delivery.keep_delivering()
            wait = Deadline(0.0 if chosen is not None else min(deadline.left(), _TICK))
            envelope = self.watch.unparked() or self.mailbox.next(self.watch.from_aggregator, wait)
            if envelope is None:
                if chosen is not None:
                    return chosen
                if deadline.passed():
                    raise RunTimeout(
                        f"node {self.transport.node_id!r} heard nothing from aggregator "
                        f"{self.aggregator_id!r} within {self.wait_timeout:g} s"
                    )
                continue
            if envelope.kind == "message":
                self._secure.answer(envelope)
                continue
            if envelope.kind == "ack":
                self.delivery.note_ack(envelope, self.instructions.run)
                continue
            if envelope.kind == "status":
                stop = self.watch.note_status(envelope)
                if stop is not None:
                    return stop
                continue
            if not self.watch.from_current(envelope, self.code):
                continue
            run = self.instructions.run
            instruction = self.instructions.admit(envelope, self.code)
            if chosen is not None and self.instructions.run != run:
                # the node moved to another run: a kick-off of the run it left is not acted on
                log.info("dropped the queued kick-off of epoch %d of run %s", chosen.epoch, run)
                chosen = None
            if instruction is None:
                self._send_again_if_asked()
                continue
            self.delivery.acked = True  # the aggregator moved on: what it needed has arrived
            if instruction.kind in ("finished", "abort"):
                return instruction
            if chosen is not None:
                log.info(
                    "skipped the queued kick-off of epoch %d: epoch %d is newer",
                    chosen.epoch,
                    instruction.epoch,
                )
            chosen = instruction

    def _send_again_if_asked(self) -> None:
        """A new aggregator process asked for epoch 0 under a run of its own: the status
        naming that run (and this node's code) first, then the cached result under it."""
        run, self.instructions.rebound = self.instructions.rebound, None
        if run is not None:
            self.board.now(self._status("sent", 0))
            self.delivery.rebind(run)

    def send_results(self, epoch: int, result: Any, privacy: dict[str, Any] | None = None) -> None:
        """Send this epoch's result to the aggregator; it is re-sent until acknowledged."""
        body = self._secure.seal(result, epoch, self.instructions.run)
        if privacy is not None and _notable(privacy):
            body = wrap_release(body, privacy)  # recorded in the run's history and manifest
        envelope = Envelope(
            self.transport.analysis_id,
            self.transport.node_id,
            self.aggregator_id,
            "result",
            epoch,
            body,
            self.instructions.run,
        )
        self.delivery.send(envelope)
        if _notable(privacy):
            self._privacy[str(epoch)] = privacy
            while len(self._privacy) > 50:  # the status keeps the latest epochs
                del self._privacy[next(iter(self._privacy))]
        self.board.soon(self._status("sent", epoch, **self._metrics()))
        self._secure.refill()

    def await_aggregation(self) -> Instruction:
        """Wait for the aggregate of the epoch just sent (or the final result / an abort)."""
        return self.await_instruction()

    def report_failure(
        self, epoch: int, exc: BaseException, *, traceback_text: str | None = None
    ) -> str:
        """Tell the aggregator this node failed; returns the (secret-free) reason sent
        (what the report may carry: node/failure)."""
        return self.failures.failure(
            epoch,
            exc,
            secrets=self.secrets,
            policy=self.policy,
            log_traceback=self.log_traceback,
            quoted_data_leaves=self.quoted_data_leaves,
            traceback_text=traceback_text,
        )

    def report_stop(self, epoch: int, signal_name: str) -> str:
        """Tell the aggregator this node was stopped (SIGINT/SIGTERM) before it exits."""
        return self.failures.stop(epoch, signal_name)

    # --- the whole run -----------------------------------------------------------------------
    def run(self, functions: AnalysisFunctions, data: Any) -> Instruction:
        """Play this node's part until the aggregator says finished; returns that instruction."""
        sources = getattr(data, "sources", None)
        if isinstance(sources, dict):
            self._versions = DataVersions.take(sources)  # before the first status names it
        self.connect()
        epoch = -1
        forwarder = LogForwarder(self.secrets) if self.policy.forward_logs else None
        if forwarder is not None:
            logging.getLogger().addHandler(forwarder)
            self.delivery.forwarder = forwarder
        runner = self._runner(functions, data)
        try:
            interrupted: Instruction | None = None
            try:
                runner.start()  # the child starts while the aggregator gathers the nodes
            except Interrupted as stop:  # an abort (or the end) arrived meanwhile: keep it
                interrupted = stop.instruction
            except Exception as exc:  # tried again, and reported, in the first epoch
                log.warning("the analysis could not be started yet: %s", exc)
            while True:
                instruction = interrupted or self.await_instruction()
                interrupted = None
                if instruction.kind == "abort":
                    self.failures.goodbye(instruction.epoch, instruction.reason, None)
                    if instruction.code == NOT_PARTICIPANT:
                        raise ConfigError(instruction.reason)
                    raise RunFailed(instruction.reason, epoch=instruction.epoch)
                if instruction.withheld and self.policy.share_aggregate:
                    raise RunFailed(  # never analyze on with previous=None: a wrong result
                        "the aggregator withheld the aggregate from this node, but this node's "
                        "policy shares aggregates (share_aggregate = true): the aggregator's "
                        "view of this node's status is wrong (a forged status?)",
                        epoch=instruction.epoch,
                    )
                if not self.policy.share_aggregate:  # keep no other sites' aggregate here
                    instruction = replace(instruction, previous=None, value=None)
                if instruction.kind == "finished":
                    self.board.now(self._status("done", instruction.epoch))
                    return instruction
                epoch = instruction.epoch
                self.board.soon(self._status("computing", epoch))
                self.context.epoch = epoch
                self.context._progress = 0.0
                _logging.set_epoch(epoch)
                started = self._epoch_started = time.perf_counter()
                try:
                    runner.start()
                    self.gate.before(epoch, runner.declared_spend)  # before any data is read
                    self._check_data()
                    outcome = analyze_epoch(runner, self.gate, epoch, instruction.previous)
                    self._check_data()  # read during analyze: the same version as before
                    release = self.gate.release(epoch, outcome)  # policy, here in the runtime
                    self.send_results(epoch, release.result, release.report())
                except Interrupted as stop:
                    log.warning(
                        "stopping epoch %d: the aggregator said %s", epoch, stop.instruction.kind
                    )
                    stop_at_once(runner)
                    interrupted = stop.instruction
                    continue
                except (Exception, SystemExit) as exc:
                    reason = self.report_failure(epoch, exc)
                    raise RunFailed(
                        f"node {self.transport.node_id!r} failed in epoch {epoch}: {reason}",
                        node=self.transport.node_id,
                        epoch=epoch,
                    ) from exc
                log.debug("epoch %d: result sent in %.3f s", epoch, time.perf_counter() - started)
        except KeyboardInterrupt as exc:
            self.report_stop(epoch, stop_signal(exc))
            stop_at_once(runner)
            raise
        except (RunFailed, ConfigError):
            stop_at_once(runner)
            raise
        except Exception as exc:
            # Lost the broker, heard nothing, could not send: say so while we still can.
            self.failures.lost(epoch, exc, self.secrets)
            raise
        finally:
            _logging.set_epoch(None)
            runner.close()
            self._secure.stop()
            self.delivery.forward_logs()
            if forwarder is not None:
                logging.getLogger().removeHandler(forwarder)
            self._drain()
            self.board.close()
            self.transport.close()

    def _drain(self) -> None:
        """Take (and acknowledge to the broker) what is queued before leaving, so a later
        process of this node does not find this run's leftovers in its session."""
        if not self.transport.keeps_sessions:
            return
        with contextlib.suppress(Exception):
            self.mailbox.next(lambda envelope: False, Deadline(0.2))

    # --- helpers -----------------------------------------------------------------------------
    def _watch_while_computing(self) -> None:
        """While the analysis child computes: an abort or the end of the run (a slow node
        under a quorum) stops it now, not when its epoch is done."""
        while True:
            envelope = self.mailbox.next(self.watch.is_stop, Deadline(0.0))
            if envelope is None:
                return
            if envelope.kind == "status":
                stop = self.watch.note_status(envelope)
                if stop is not None:
                    raise Interrupted(stop)
                continue
            if not self.watch.from_current(envelope, self.code):
                continue
            instruction = self.instructions.admit(envelope, self.code)
            if instruction is not None:
                raise Interrupted(instruction)

    def _runner(self, functions: AnalysisFunctions, data: Any) -> Runner:
        """Where `analyze` runs (node/compute), its rows read counted for progress."""
        runner = make_runner(
            functions,
            data,
            self.context,
            self.gate,
            isolate=self.isolate,
            pooled=self.pooled,
            timeout=self.wait_timeout,
            policy=self.policy,
            hide=self.hide,
            on_wait=self._watch_while_computing,
        )
        self._rows_read = lambda: runner.rows_read
        return runner

    def _status(self, state: str, epoch: int = -1, **extra: Any) -> dict[str, Any]:
        status = {
            "state": state,
            "role": "analysis",
            "session": self.session,
            **({"code": self.code} if self.code else {}),
            "run": self.instructions.run,
            "epoch": epoch,
            "time": time.time(),
            **extra,
        }
        if state == "computing":
            status.setdefault("progress", 0.0)
        if self._privacy:
            status["privacy"] = dict(self._privacy)
        if not self.policy.share_aggregate:
            status["share_aggregate"] = False  # the aggregator sends this node no aggregates
        if self._versions is not None and self._versions.count:
            status["data"] = self._versions.digest  # which data version this run computes on
        return status

    def _check_data(self) -> None:
        """DataError naming a file of a local source that changed since the run started."""
        if self._versions is not None:
            self._versions.check()

    def _metrics(self) -> dict[str, Any]:
        """Per-epoch figures for `flame status`: compute time and traffic so far."""
        return {
            "duration_s": round(time.perf_counter() - self._epoch_started, 6),
            "bytes_sent": self.transport.bytes_sent,
            "bytes_received": self.transport.bytes_received,
        }

    def _report_progress(self, fraction: float) -> None:
        if not self.gate.lets_progress_out(self._rows_read()):
            return
        try:
            self.board.soon(
                self._status("computing", self.context.epoch, progress=round(fraction, 1))
            )
        except Exception as exc:  # progress is best effort
            log.debug("progress not published: %s", exc)

"""The analysis node: wait for the aggregator's word, analyze, send, repeat until finished.

The aggregator drives the epochs: `start` (epoch 0, or a resume), `aggregate` (epoch e done,
compute e+1), `finished` or `abort`. A node that restarts simply waits; the aggregator sees
its new session and sends it the current epoch again.

Delivery is end to end: a result counts once the aggregator acknowledges it (an `ack`
envelope), not when the broker has it. Until then the node re-sends it after the broker lost
its session and on a backing-off timer. Every kick-off names a run id; a `start` under a new
run id (an aggregator that restarted without storage) makes the node start over, and nothing
of a run it left is acted on again. Whatever stops the node other than `finished` (a failure,
an abort, SIGINT/SIGTERM) is announced: an error report to the aggregator and a `failed`
status with the reason.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flame.aggregator.membership import Instances
from flame.analysis.functions import AnalysisFunctions
from flame.data.versions import DataVersions
from flame.errors import (
    AnalysisError,
    ConfigError,
    FlameError,
    NotAcknowledged,
    PolicyRefused,
    RunFailed,
    RunTimeout,
    TransportError,
    stop_signal,
)
from flame.isolation.runner import ChildRunner, InProcessRunner, Outcome, Runner
from flame.node.context import Context
from flame.node.log_forward import LOG_CATEGORY, LogForwarder
from flame.node.mailbox import Mailbox
from flame.node.run_end import ends_this_run
from flame.node.secure_answers import SecureAnswers
from flame.node.status_board import StatusBoard
from flame.privacy.disclosure import wrap_release
from flame.privacy.policy import NodePolicy
from flame.privacy.quoting import quoted_may_leave, withhold_quoted
from flame.privacy.release import Gate, column_reader
from flame.privacy.tracebacks import analysis_traceback, trim_traceback_text
from flame.secure.endorse import ENDORSE
from flame.secure.fields import DECRYPT, Precomputer, SecureKeys, seal
from flame.secure.masking import MASK, MASKED, MaskingNode, MaskingSettings
from flame.transport.base import Transport
from flame.utils import logs as _logging
from flame.utils.deadline import Deadline
from flame.utils.public_reason import public_reason
from flame.utils.redact import describe_exception
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


class _Interrupted(Exception):
    """The aggregator ended the run (abort, finished) while this node was computing."""

    def __init__(self, instruction: Instruction) -> None:
        super().__init__(instruction.kind)
        self.instruction = instruction


def _stop_at_once(runner: Runner) -> None:
    """A run that failed or was stopped does not wait for its analysis child to finish."""
    kill = getattr(runner, "_abandon", None)
    if callable(kill):
        with contextlib.suppress(Exception):
            kill()


log = logging.getLogger(__name__)

_CONTROL = ("start", "aggregate", "finished", "abort")
NOT_PARTICIPANT = "not_participant"  # an abort's code: this node is not in the run's roster
_TICK = 1.0  # seconds between checks for re-sends while waiting
_MAX_RESEND_INTERVAL = 120.0
_GOODBYE_TIMEOUT = 5.0  # seconds for a last report or a re-send: never stall on a dead broker


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


def _raised_by_analysis(exc: BaseException) -> bool:
    """An exception of the analyst's code (in the child or in this process), not flame's.
    Every AnalysisError is: the child chooses its type name, and even flame's own words for
    it (ProtocolError, ProcessExit) echo what the child sent or its exit status."""
    return isinstance(exc, AnalysisError) or not isinstance(exc, FlameError)


def _public_type(exc: BaseException) -> str:
    """The failure's type as it may leave under send_tracebacks = false: a built-in exception
    name or flame's own, else `Exception` (an analysis may name a class after a record)."""
    name = getattr(exc, "remote_type", None) or type(exc).__name__
    known = getattr(builtins, name, None) if isinstance(name, str) else None
    if name in ("ProtocolError", "ProcessExit") or (
        isinstance(known, type) and issubclass(known, BaseException)
    ):
        return str(name)
    return "Exception"


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
        self.mailbox = Mailbox(transport)
        self.aggregator_id = aggregator_id
        self.wait_timeout = wait_timeout
        self.session = uuid.uuid4().hex
        self.secrets = list(secrets)
        self.keys = keys
        self.masking = None  # FLAME_SECURE__SCHEME=masking: flame.secure.masking
        if masking is not None:
            self.masking = MaskingNode(
                masking,
                transport.analysis_id,
                transport.node_id,
                participants,
                aggregator_id,
                transport.auth,
                state,
            )
        self.resend_interval = resend_interval
        self.log_traceback = log_traceback  # off where the aggregator logs to the same place
        self._precomputer: Precomputer | None = None
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
        self._last_epoch = -1
        self._secure = SecureAnswers(keys, transport, lambda: self.context._state)
        self.code = code  # SHA-256 of the analysis code, announced for the aggregator to compare
        self._instances = Instances()  # the aggregator's process: two at once stop the run
        self._last_sent: Envelope | None = None
        self._epoch_started = time.perf_counter()
        self._run: str | None = None
        self._left_runs: set[str] = set()
        self._acked = True
        self._resend_every = resend_interval
        self._resend_at = 0.0
        self._aggregator_away = False  # its last will said offline; cleared by its next status
        self._link = 0
        self._aggregator_session: str | None = None  # the live aggregator process
        self._aggregator_last: dict[str, Any] = {}  # its latest verified status
        self._parked: list[Envelope] = []
        self._forwarder: LogForwarder | None = None
        self._said_goodbye = False
        self.board = StatusBoard(transport)  # routine statuses kept off the critical path
        self._versions: DataVersions | None = None

    # --- the protocol steps ------------------------------------------------------------------
    def connect(self) -> None:
        if self.keys is not None and self.keys.private_key is None and self._precomputer is None:
            self._precomputer = Precomputer(self.keys)
            self._precomputer.fill(self.keys.precompute)
        if self.policy.share_aggregate:  # the kick-offs everyone gets, with the aggregate
            self.transport.take_broadcasts()
        self.transport.connect(self._status("waiting"))
        self._link = self.transport.link
        self.transport.watch([self.aggregator_id])

    def await_instruction(self) -> Instruction:
        """The next instruction from the aggregator; duplicates, old epochs and runs skipped.

        When several kick-offs are queued (a slow node under a quorum), only the newest counts,
        and a queued `finished` or `abort` wins over any kick-off: a finished run is not
        worked through epoch by epoch.
        """
        deadline = Deadline(self.wait_timeout)
        chosen: Instruction | None = None
        while True:
            self._keep_delivering()
            wait = Deadline(0.0 if chosen is not None else min(deadline.left(), _TICK))
            envelope = self._unparked() or self.mailbox.next(self._from_aggregator, wait)
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
                self._answer_decrypt(envelope)
                continue
            if envelope.kind == "ack":
                self._note_ack(envelope)
                continue
            if envelope.kind == "status":
                stop = self._note_aggregator_status(envelope)
                if stop is not None:
                    return stop
                continue
            if not self._from_current_aggregator(envelope):
                continue
            instruction = self._admit(envelope)
            if instruction is None:
                continue
            self._acked = True  # the aggregator moved on: what it needed of us has arrived
            if instruction.kind in ("finished", "abort"):
                return instruction
            if chosen is not None:
                log.info(
                    "skipped the queued kick-off of epoch %d: epoch %d is newer",
                    chosen.epoch,
                    instruction.epoch,
                )
            chosen = instruction

    def send_results(self, epoch: int, result: Any, privacy: dict[str, Any] | None = None) -> None:
        """Send this epoch's result to the aggregator; it is re-sent until acknowledged."""
        self._specs = {}
        if self.keys is not None:
            self.keys.used_ciphertexts = 0
        origin = (self.transport.analysis_id, epoch, self.transport.node_id)
        if self.masking is not None:
            body = self.masking.seal(result, epoch)
        else:
            body = seal(result, self.keys, self._specs, origin)
            self._secure.sent(epoch, body, self._specs)
        if privacy is not None and _notable(privacy):
            body = wrap_release(body, privacy)  # recorded in the run's history and manifest
        envelope = Envelope(
            self.transport.analysis_id,
            self.transport.node_id,
            self.aggregator_id,
            "result",
            epoch,
            body,
            self._run,
        )
        self._last_epoch = epoch
        self._last_sent = envelope
        self._acked = False
        self._resend_every = self.resend_interval
        try:
            self.transport.send(envelope)
        except NotAcknowledged as exc:
            # Not a refusal: the broker is out of reach (a partition, a slow uplink). The
            # result is kept and re-sent with backoff; only the aggregator's epoch deadline
            # (its abort, or this node's wait for the next instruction) ends the run.
            log.warning(
                "epoch %d: result not acknowledged yet, keeping it and re-sending: %s", epoch, exc
            )
        self._resend_at = time.monotonic() + self._resend_every
        if _notable(privacy):
            self._privacy[str(epoch)] = privacy
            while len(self._privacy) > 50:  # the status keeps the latest epochs
                del self._privacy[next(iter(self._privacy))]
        self.board.soon(self._status("sent", epoch, **self._metrics()))
        if self._precomputer is not None and self.keys is not None:
            self._precomputer.fill(self.keys.used_ciphertexts)  # for the next epoch

    def await_aggregation(self) -> Instruction:
        """Wait for the aggregate of the epoch just sent (or the final result / an abort)."""
        return self.await_instruction()

    def report_failure(
        self, epoch: int, exc: BaseException, *, traceback_text: str | None = None
    ) -> str:
        """Tell the aggregator this node failed; returns the (secret-free) reason sent.

        `traceback_text` (already trimmed, e.g. from an isolated child process) is sent when
        the node's policy allows; without it, the traceback of `exc` is formatted here.
        """
        reason = describe_exception(exc, self.secrets)
        body: dict[str, Any] = {
            "node": self.transport.node_id,
            "epoch": epoch,
            "error": reason,
            "session": self.session,
        }
        if traceback_text is None:
            traceback_text = getattr(exc, "traceback_text", None)  # from the analysis child
        if not traceback_text:
            traceback_text = analysis_traceback(exc, self.secrets)
        else:
            traceback_text = trim_traceback_text(traceback_text, self.secrets)
        full = (reason, traceback_text)
        if self.log_traceback:
            log.error("epoch %d failed: %s\n%s", epoch, reason, traceback_text)
        else:
            log.debug("epoch %d failed: %s", epoch, reason)
        if not self.quoted_data_leaves:  # a parser's words quoting a record stay here
            reason, traceback_text = withhold_quoted(reason), withhold_quoted(traceback_text)
            body["error"] = reason
        if isinstance(exc, PolicyRefused):
            # The aggregator may count it as a missing answer (under a quorum) instead of a
            # failure; a refusal's text is flame's own, and no traceback goes with it.
            body["refused"] = True
        elif self.policy.send_tracebacks:
            body["traceback"] = traceback_text
        elif _raised_by_analysis(exc):  # its message is as free to carry records as a traceback
            name = _public_type(exc)
            reason = f"{name} (message withheld: this node's policy has send_tracebacks = false)"
            body["error"] = reason
        if reason != full[0] and not self.log_traceback:  # what stays here, said here (simulate)
            log.error("epoch %d failed: %s\n%s", epoch, full[0], full[1])
        self._say_goodbye(epoch, reason, body)
        return reason

    def report_stop(self, epoch: int, signal_name: str) -> str:
        """Tell the aggregator this node was stopped (SIGINT/SIGTERM) before it exits."""
        reason = f"stopped: {signal_name}"
        body = {"node": self.transport.node_id, "epoch": epoch, "error": reason}
        body["session"] = self.session
        self._say_goodbye(epoch, reason, {**body, "stopped": signal_name})
        return reason

    def _say_goodbye(self, epoch: int, reason: str, body: dict[str, Any] | None) -> None:
        """The error report (if any) and the `failed` status; once, and never raising."""
        if self._said_goodbye:
            return
        self._said_goodbye = True
        self._forward_logs()
        try:
            if body is not None:
                self.transport.send(
                    Envelope(
                        self.transport.analysis_id,
                        self.transport.node_id,
                        self.aggregator_id,
                        "error",
                        epoch,
                        body,
                    ),
                    _GOODBYE_TIMEOUT,
                )
            # every roster member reads statuses: no exception message (red team B2)
            self.board.now(self._status("failed", epoch, reason=public_reason(reason)))
        except Exception as send_exc:  # the failure report must not mask the failure
            log.error("could not report the failure to the aggregator: %s", send_exc)

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
            self._forwarder = forwarder
        runner = self._runner(functions, data)
        try:
            interrupted: Instruction | None = None
            try:
                runner.start()  # the child starts while the aggregator gathers the nodes
            except _Interrupted as stop:  # an abort (or the end) arrived meanwhile: keep it
                interrupted = stop.instruction
            except Exception as exc:  # tried again, and reported, in the first epoch
                log.warning("the analysis could not be started yet: %s", exc)
            while True:
                instruction = interrupted or self.await_instruction()
                interrupted = None
                if instruction.kind == "abort":
                    self._say_goodbye(instruction.epoch, instruction.reason, None)
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
                    outcome = self._analyze(runner, epoch, instruction.previous)
                    self._check_data()  # read during analyze: the same version as before
                    release = self.gate.release(epoch, outcome)  # policy, here in the runtime
                    self.send_results(epoch, release.result, release.report())
                except _Interrupted as stop:
                    log.warning(
                        "stopping epoch %d: the aggregator said %s", epoch, stop.instruction.kind
                    )
                    _stop_at_once(runner)
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
            _stop_at_once(runner)
            raise
        except (RunFailed, ConfigError):
            _stop_at_once(runner)
            raise
        except Exception as exc:
            # Lost the broker, heard nothing, could not send: say so while we still can.
            self._say_goodbye(
                epoch,
                describe_exception(exc, self.secrets),
                {
                    "node": self.transport.node_id,
                    "epoch": epoch,
                    "error": describe_exception(exc, self.secrets),
                    "session": self.session,
                },
            )
            raise
        finally:
            _logging.set_epoch(None)
            runner.close()
            if self._precomputer is not None:
                self._precomputer.stop()
            self._forward_logs()
            if forwarder is not None:
                logging.getLogger().removeHandler(forwarder)
            self._drain()
            self.board.close()
            self.transport.close()

    # --- delivery ----------------------------------------------------------------------------
    def _forward_logs(self) -> None:
        """This node's collected log lines to the aggregator (policy `forward_logs`)."""
        if self._forwarder is None:
            return
        lines = self._forwarder.take()
        if not lines:
            return
        envelope = Envelope(
            self.transport.analysis_id,
            self.transport.node_id,
            self.aggregator_id,
            "message",
            max(self.context.epoch, 0),
            {"lines": lines},
            LOG_CATEGORY,
        )
        try:
            self.transport.send(envelope, _GOODBYE_TIMEOUT)
        except Exception as exc:  # forwarding is best effort
            log.debug("could not forward %d log lines: %s", len(lines), exc)

    def _keep_delivering(self) -> None:
        """Re-send the unacknowledged result: at once after a lost session, else on a timer."""
        self._forward_logs()
        if self._acked or self._last_sent is None:
            return
        link = self.transport.link
        if link != self._link:
            self._link = link
            self._resend("the broker lost this node's session")
        elif time.monotonic() >= self._resend_at:
            self._resend(f"not acknowledged within {self._resend_every:g} s")
            self._resend_every = min(self._resend_every * 2, _MAX_RESEND_INTERVAL)
        else:
            return
        self._resend_at = time.monotonic() + self._resend_every

    def _resend(self, why: str) -> None:
        assert self._last_sent is not None
        log.info("re-sending the result of epoch %d (%s)", self._last_sent.epoch, why)
        again = replace(self._last_sent, id=uuid.uuid4().hex, sent=time.time())
        try:
            self.transport.send(again, _GOODBYE_TIMEOUT)
        except TransportError as exc:
            log.warning("could not re-send the result of epoch %d: %s", again.epoch, exc)

    def _note_ack(self, envelope: Envelope) -> None:
        body = envelope.body if isinstance(envelope.body, dict) else {}
        if (
            self._last_sent is not None
            and body.get("epoch") == self._last_sent.epoch
            and body.get("run") in (None, self._run)
        ):
            self._acked = True

    def _note_aggregator_status(self, envelope: Envelope) -> Instruction | None:
        """Track the aggregator's process; its `failed` status stops us even if the abort is
        lost. A stale status of an earlier aggregator process (other session) is not acted on."""
        body = envelope.body if isinstance(envelope.body, dict) else {}
        problem = self._instances.note(self.aggregator_id, body)
        if problem is not None:
            return Instruction("abort", -1, reason=problem)
        state = body.get("state")
        session = body.get("session")
        self._aggregator_last = body
        if state == "offline" or (body.get("online") is False and state not in ("failed",)):
            log.warning("aggregator %s is offline; waiting for it", self.aggregator_id)
            self._aggregator_away = True
            return None
        if self._aggregator_away:  # back (partition over, or restarted): re-send at once,
            self._aggregator_away = False  # not when the backed-off timer next fires
            self._resend_every = self.resend_interval
            self._resend_at = 0.0
        if state == "failed":
            if session is not None and session == self._aggregator_session:
                epoch = body.get("epoch")
                return Instruction(
                    "abort",
                    epoch if isinstance(epoch, int) else -1,
                    reason=str(body.get("reason") or "the aggregator failed")[:2000],
                )
            return None
        if state == "done" or not isinstance(session, str):
            return None
        if session != self._aggregator_session and self._aggregator_session is not None:
            log.info("aggregator %s restarted (new process)", self.aggregator_id)
        self._aggregator_session = session
        return None

    def _from_current_aggregator(self, envelope: Envelope) -> bool:
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
        if self._aggregator_session is None:
            last = self._aggregator_last
            if (
                envelope.kind == "finished"
                and last.get("state") == "done"
                and session == last.get("session")
                and ends_this_run(last, body, self.code)
            ):
                return True  # the run ended before this node joined: take its result
            self._parked.append(envelope)
            return False
        if session == self._aggregator_session:
            return True
        log.info("ignored a %s from an earlier aggregator process", envelope.kind)
        return False

    def _unparked(self) -> Envelope | None:
        """A parked control message, once the live aggregator process is known."""
        if self._parked and self._aggregator_session is not None:
            return self._parked.pop(0)
        return None

    def _drain(self) -> None:
        """Take (and acknowledge to the broker) what is queued before leaving, so a later
        process of this node does not find this run's leftovers in its session."""
        if not self.transport.keeps_sessions:
            return
        with contextlib.suppress(Exception):
            self.mailbox.next(lambda envelope: False, Deadline(0.2))

    def _admit(self, envelope: Envelope) -> Instruction | None:
        """The instruction in `envelope` if it is new for this node, after run-id bookkeeping."""
        if isinstance(envelope.body, dict) and envelope.body.get("probe") is True:
            return None  # the aggregator asking whether broadcasts reach us: the transport noted it
        instruction = self._parse(envelope)
        if instruction is None:
            return None
        run = instruction.run
        if run is not None and run != self._run:
            if run in self._left_runs:
                log.info("ignored a %s of run %s, which this node left", instruction.kind, run)
                return None
            if instruction.kind in ("start", "aggregate"):
                if self._run is not None:
                    log.warning(
                        "the aggregator started run %s over (this node was in run %s, epoch "
                        "%d); computing again from epoch %d",
                        run,
                        self._run,
                        self._last_epoch,
                        instruction.epoch,
                    )
                    self._left_runs.add(self._run)
                    self._last_epoch = -1
                    self._last_sent = None
                    self._acked = True
                self._run = run
        if instruction.kind in ("start", "aggregate") and instruction.epoch <= self._last_epoch:
            if instruction.epoch == self._last_epoch and self._last_sent is not None:
                # A restarted aggregator may have lost it: send again, never recompute.
                self._resend("the aggregator asked for this epoch again")
            return None
        return instruction

    # --- helpers -----------------------------------------------------------------------------
    def _watch_while_computing(self) -> None:
        """While the analysis child computes: an abort or the end of the run (a slow node
        under a quorum) stops it now, not when its epoch is done."""
        while True:
            envelope = self.mailbox.next(self._is_stop, Deadline(0.0))
            if envelope is None:
                return
            if envelope.kind == "status":
                stop = self._note_aggregator_status(envelope)
                if stop is not None:
                    raise _Interrupted(stop)
                continue
            if not self._from_current_aggregator(envelope):
                continue
            instruction = self._admit(envelope)
            if instruction is not None:
                raise _Interrupted(instruction)

    def _is_stop(self, envelope: Envelope) -> bool:
        return envelope.sender == self.aggregator_id and envelope.kind in (
            "abort",
            "finished",
            "status",
        )

    def _analyze(self, runner: Runner, epoch: int, previous: Any) -> Outcome:
        """One epoch of `analyze`; a message the policy refused fails it with that reason."""
        try:
            outcome = runner.run(epoch, previous)
        except _Interrupted:
            raise
        except Exception:
            self.gate.refused(epoch)  # the node's own refusal caused this: say so
            raise
        self.gate.refused(epoch)  # analyze caught the refusal and went on: the epoch fails
        return outcome

    def _runner(self, functions: AnalysisFunctions, data: Any) -> Runner:
        """Where `analyze` runs: an isolated child (nodes, CLI) or this process (Python API)."""
        if self.isolate and self.pooled:
            from flame.isolation.pooled import PooledRunner

            child: ChildRunner = PooledRunner(
                functions.analyze,
                data,
                self.context,
                timeout=self.wait_timeout,
                cut_network=self.policy.cut_network,
                hide=self.hide,
                allow_messages=self.policy.allow_messages,
            )
            child.on_wait = self._watch_while_computing
            runner: Runner = child
        elif self.isolate:
            child = ChildRunner(
                functions.analyze,
                data,
                self.context,
                timeout=self.wait_timeout,
                cut_network=self.policy.cut_network,
                capture_output=self.policy.forward_logs,
                hide=self.hide,
                allow_messages=self.policy.allow_messages,
            )
            child.on_wait = self._watch_while_computing
            runner = child
        else:
            runner = InProcessRunner(functions.analyze, data, self.context)
        hidden = [os.path.realpath(str(p)) for p in self.hide]
        self.gate.reader = column_reader(data, hidden)  # flame.dp statistics read data here
        self._rows_read = lambda: runner.rows_read
        # what analyze sends to other nodes leaves only as the policy allows (like a result)
        self.context.outgoing = lambda body: self.gate.message(
            self.context.epoch, body, runner.rows_read
        )
        return runner

    def _from_aggregator(self, envelope: Envelope) -> bool:
        return envelope.sender == self.aggregator_id and (
            envelope.kind in _CONTROL
            or envelope.kind in ("status", "ack")
            or (envelope.kind == "message" and envelope.category in (DECRYPT, ENDORSE, MASK))
        )

    def _answer_decrypt(self, envelope: Envelope) -> None:
        if envelope.category == MASK:  # a round of a masked secure sum
            mask = self.masking.answer(envelope) if self.masking is not None else None
            error = {"error": "this node does not sum with masking (FLAME_SECURE__SCHEME)"}
            self.transport.send(envelope.reply("message", mask or error, category=MASKED))
            return
        self._secure.answer(envelope)

    def _parse(self, envelope: Envelope) -> Instruction | None:
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
            if not ends_this_run(None, body, self.code):
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
            code = body.get("code")
            return Instruction(
                "abort",
                envelope.epoch,
                reason=str(body.get("reason", "aborted"))[:2000],
                run=run,
                code=code if isinstance(code, str) else "",
            )
        return None

    def _status(self, state: str, epoch: int = -1, **extra: Any) -> dict[str, Any]:
        status = {
            "state": state,
            "role": "analysis",
            "session": self.session,
            **({"code": self.code} if self.code else {}),
            "run": self._run,
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

"""The aggregation node: drives the epochs of the star protocol.

presence -> for each epoch: send the kick-off, await results (all, or quorum at the
deadline), aggregate, decide convergence, checkpoint -> finished. Every wait has a deadline;
a failing node aborts the run for everyone with that node's reason.

Every kick-off names a run id, and a result counts only under the run id of this process's
kick-offs. Without a checkpoint a process names a run of its own: nodes still in epoch 0 send
their cached results again under it, nodes past it (the previous aggregate is lost) start the
analysis over. With a checkpoint it continues the checkpoint's run (signed into it) if a
quorum of participants name it in statuses signed since this process started and none names
another; else it names a run of its own and the nodes compute the checkpoint's next epoch
again under it. Results are acknowledged end to end (`ack`), and a node whose broker
session was lost (its status' `link` count grew) is sent the current kick-off again
(rate-limited). Any stop other than a finished run (a failure, SIGINT/SIGTERM) sends every
node an abort with the reason.

This module is the epoch loop; its parts by job are `presence` (who is there, the run to
continue, the farewell), `sending` (kick-offs, control messages, acks) and `failures` (error
reports, the abort, forwarded logs kept in storage).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from flame.aggregator.failures import Failures
from flame.aggregator.honesty import warn_if_dishonest
from flame.aggregator.presence import Presence
from flame.aggregator.records import (
    Checkpoint,
    EpochRecord,
    Event,
    EventSink,
    RunResult,
    RunStore,
    numeric_summary,
)
from flame.aggregator.sending import Sending
from flame.analysis.functions import AnalysisFunctions
from flame.errors import ConfigError, RunFailed, RunTimeout, stop_signal
from flame.node.context import Context, Liveness, active
from flame.node.mailbox import Mailbox, envelope_size
from flame.node.status_board import StatusBoard
from flame.privacy.central import CentralDP
from flame.privacy.disclosure import reveal_suppressed, unwrap_release
from flame.secure.fields import SecureKeys
from flame.secure.summer import SecureSummer
from flame.transport.base import Transport
from flame.utils import logs as _logging

if TYPE_CHECKING:  # masking loads only for FLAME_SECURE__SCHEME=masking
    from flame.secure.masking import MaskingSettings
    from flame.secure.masking_sum import MaskingSummer
from flame.utils.deadline import Deadline
from flame.utils.redact import describe_exception
from flame.wire.envelope import Envelope, Kind

__all__ = ["Aggregator"]

log = logging.getLogger(__name__)

_DELIVERY_POLL = 0.05  # seconds between looks at whether the broker accepted the kick-off


class Aggregator(Presence, Sending, Failures):
    """The one node that sees every result and produces the aggregate."""

    def __init__(
        self,
        transport: Transport,
        functions: AnalysisFunctions,
        *,
        participants: Sequence[str],
        epochs: int = 1,
        quorum: int | None = None,
        epoch_timeout: float = 600.0,
        presence_timeout: float = 300.0,
        store: RunStore | None = None,
        on_event: EventSink | None = None,
        seed: int | None = None,
        secrets: Sequence[str] = (),
        keys: SecureKeys | None = None,
        code: str | None = None,
        masking: MaskingSettings | None = None,
        central: CentralDP | None = None,
    ) -> None:
        if not participants:
            raise ValueError("an aggregator needs at least one participant")
        self.transport = transport
        self.functions = functions
        self.participants = sorted(participants)
        self.epochs = epochs
        self.quorum = len(self.participants) if quorum is None else quorum
        self.epoch_timeout = epoch_timeout
        self.presence_timeout = presence_timeout
        self.store = store
        self.on_event = on_event
        # noise for flame.dp markers in the aggregate, from the aggregator's own budget
        self.central = central or CentralDP(
            None, node_id=transport.node_id, analysis_id=transport.analysis_id
        )
        self.secrets = list(secrets)
        if keys is not None and keys.private_key is not None:
            raise ConfigError(
                "the aggregation node must not hold the private key of secure aggregation"
            )
        self.mailbox = Mailbox(transport, transport.node_id)
        self.code = code  # SHA-256 of the analysis code: every node must announce the same
        self.board = StatusBoard(transport)  # routine statuses kept off the critical path
        self.session = uuid.uuid4().hex
        self.context = Context(
            analysis_id=transport.analysis_id,
            node_id=transport.node_id,
            role="aggregation",
            participants=self.participants,
            aggregator_id=transport.node_id,
            mailbox=self.mailbox,
            seed=seed,
        )
        self.secure_sum: SecureSummer | MaskingSummer = SecureSummer(
            keys, epoch_timeout, self.context, None if keys is None else keys.confirm_fraction
        )
        if masking is not None:  # FLAME_SECURE__SCHEME=masking (imported only then)
            from flame.secure.masking_sum import MaskingSummer

            self.secure_sum = MaskingSummer(
                masking, epoch_timeout, self.context, self.participants, transport.auth
            )
        self._init_presence()  # who is online, in which process; who is gone
        self._init_sending()  # fanout, the kick-off's delivery, acks not sent yet
        self._init_failures()  # forwarded node logs kept with the run
        self._kickoff: tuple[Kind, int, Any] | None = None
        self._epoch = -1
        self.run_id: str | None = None
        self._arrivals: dict[str, float] = {}
        self._privacy: dict[str, Any] = {}
        self._result_bytes: dict[str, int] = {}

    # --- the run -----------------------------------------------------------------------------
    def execute(self) -> RunResult:
        """Run every epoch and return the final result; raise RunFailed/RunTimeout otherwise."""
        self.transport.connect(self._status("waiting"))
        self.transport.watch(None)  # participants, and anyone who thinks they are one
        try:
            return self._execute()
        except (RunFailed, RunTimeout, ConfigError) as exc:
            epoch = getattr(exc, "epoch", None)
            self._abort(str(exc), self._epoch if epoch is None else epoch, exc)
            self._emit(Event("failed", detail=str(exc)))
            raise
        except KeyboardInterrupt as exc:
            reason = f"node {self.transport.node_id!r} stopped: {stop_signal(exc)}"
            log.error("%s; telling every node", reason)
            self._abort(reason, self._epoch)
            self._emit(Event("failed", detail=reason))
            raise
        except Exception as exc:
            reason = f"aggregator failed: {describe_exception(exc, self.secrets)}"
            self._abort(reason, self._epoch)
            self._emit(Event("failed", detail=reason))
            raise RunFailed(reason, node=self.transport.node_id) from exc
        finally:
            _logging.set_epoch(None)
            if self._delivery is not None:
                self._delivery.abandon()
            self.board.close()
            self.transport.close()

    def _execute(self) -> RunResult:
        finished = self.store.load_final() if self.store is not None else None
        if finished is not None:
            log.warning(
                "analysis %s already finished; announcing its stored result", finished.analysis_id
            )
            self.run_id = uuid.uuid4().hex[:16]
            self._announce_final(finished)
            return finished
        checkpoint = self.store.load_checkpoint() if self.store is not None else None
        history: list[EpochRecord] = list(checkpoint.history) if checkpoint else []
        previous: Any = checkpoint.previous if checkpoint else None
        first = checkpoint.next_epoch if checkpoint else 0
        if checkpoint:
            log.info("resuming from checkpoint: next epoch %d", first)
        self._await_presence()
        self._choose_run(
            resuming=checkpoint is not None, run=checkpoint.run if checkpoint else None
        )
        if first == 0:
            self._kickoff = ("start", 0, {"previous": None, "run": self.run_id})
        else:
            self._kickoff = (
                "aggregate",
                first - 1,
                {"value": previous, "converged": False, "run": self.run_id},
            )
        self._broadcast(*self._kickoff, confirm_later=True)
        value: Any = previous
        converged = False
        for epoch in range(first, self.epochs):
            self._epoch = epoch
            _logging.set_epoch(epoch)
            started = time.time()
            received, sent = self.transport.bytes_received, self.transport.bytes_sent
            last_epoch = {"last_epoch": history[-1].to_dict(summary=False)} if history else {}
            self.board.soon(self._status("collecting", epoch, **last_epoch))
            self._emit(Event("epoch_started", epoch, expected=len(self.participants)))
            results = self._await_parameters(epoch)
            self._kickoff_accepted(wait=True)  # long since, as a rule: the results are in
            self._acknowledge_if_slow()
            value = self._aggregate_parameters(results, epoch, previous)
            converged = self._converged(value, previous, epoch)
            record = EpochRecord(
                epoch=epoch,
                nodes=sorted(results),
                missing=[n for n in self.participants if n not in results],
                started=started,
                duration=time.time() - started,
                converged=converged,
                bytes_received=self.transport.bytes_received - received,
                bytes_sent=self.transport.bytes_sent - sent,
                arrivals=dict(self._arrivals),
                privacy=dict(self._privacy),
                result_bytes=dict(self._result_bytes),
                absent=dict(self._absent),
                data=dict(self._data_versions),
                summary=numeric_summary(value),
            )
            last = converged or epoch + 1 == self.epochs
            if not last and self.store is not None:
                # Before the kick-off: an aggregator restarted after it must not resume behind
                # the nodes (they would be an epoch ahead, their results "future", the run stuck
                # until the epoch timeout). The record here lacks the kick-off's bytes.
                checkpoint = Checkpoint(epoch + 1, value, [*history, record], self.run_id)
                self.store.save_checkpoint(checkpoint)
            if not last:
                self._send_parameters(epoch, value)
                record = replace(record, bytes_sent=self.transport.bytes_sent - sent)
            history.append(record)
            self._emit(Event("epoch_finished", epoch, record=record, received=len(results)))
            if last:
                break
            previous = value
        warn_if_dishonest(value, converged, self.functions.converged is not None, self.epochs)
        result = RunResult(
            self.transport.analysis_id, value, converged, len(history), list(history)
        )
        self._save_logs()
        if self.store is not None:
            location = self.store.save_final(result)
            result = RunResult(
                result.analysis_id, value, converged, result.epochs, result.history, location
            )
        self._announce_final(result)
        return result

    def _announce_final(self, result: RunResult) -> None:
        last = result.epochs - 1
        body = {
            "value": result.value,
            "converged": result.converged,
            "epochs": result.epochs,
            "location": result.location,
            "run": self.run_id,
            **({"code": self.code} if self.code else {}),  # nodes of other code refuse it
        }
        self._broadcast("finished", last, body)
        self._kickoff = ("finished", last, body)
        self._await_farewell(set(result.history[-1].nodes) if result.history else set())
        self.board.now(
            self._status(
                "done",
                last,
                location=result.location,
                last_epoch=result.history[-1].to_dict(summary=False) if result.history else None,
            )
        )
        self._emit(Event("finished", last, detail=result.location or ""))

    # --- the protocol steps ------------------------------------------------------------------
    def _await_parameters(self, epoch: int) -> dict[str, Any]:
        """Collect this epoch's results: each node counted once, old epochs ignored."""
        deadline = Deadline(self.epoch_timeout)
        started = time.monotonic()
        results: dict[str, Any] = {}
        self._arrivals, self._result_bytes = {}, {}  # for the epoch record (reports)
        self._privacy = {}  # node -> DP spend / suppressed cells this epoch
        self._absent: dict[str, str] = {}  # node -> why it gave no result this epoch
        self._data_versions: dict[str, str] = {}  # node -> its data's fingerprint digest
        self._unacked = []
        while not self._gone.epoch_complete(results, epoch):
            wait = deadline
            if self._unacked:
                wait = Deadline(min(deadline.left(), self._unacked[0][0] - time.monotonic()))
            if not self._kickoff_accepted(wait=False) or self._owed:  # look again soon
                wait = Deadline(min(wait.left(), _DELIVERY_POLL))
            envelope = self.mailbox.next(self._is_protocol, wait)
            self._send_acks()  # the due ones, also while the inbox stays busy
            self.resend_owed()
            if envelope is None:
                if not deadline.passed():
                    continue
                break
            if envelope.kind == "status":
                self._note_status(
                    envelope, rejoin_epoch=None if envelope.sender in results else epoch
                )
            elif envelope.kind == "error":
                self._fail_from(envelope)
            elif envelope.kind == "message":
                self._note_logs(envelope)
            elif envelope.kind == "result":
                if envelope.sender not in self.participants:
                    log.warning("ignored a result from %r, not a participant", envelope.sender)
                elif envelope.category != self.run_id:  # naming no run: no run's
                    log.info(
                        "ignored %s's result of run %s (this is run %s)",
                        envelope.sender,
                        envelope.category,
                        self.run_id,
                    )
                elif envelope.epoch > epoch:
                    log.warning(
                        "ignored %s's result for future epoch %d", envelope.sender, envelope.epoch
                    )
                elif self._acknowledge_later(envelope) and envelope.epoch != epoch:
                    log.info("ignored %s's result for epoch %d", envelope.sender, envelope.epoch)
                elif envelope.sender in results:
                    log.info("ignored a second result from %s in epoch %d", envelope.sender, epoch)
                else:
                    results[envelope.sender], privacy = unwrap_release(envelope.body)
                    if privacy is not None:
                        self._privacy[envelope.sender] = privacy
                    self._arrivals[envelope.sender] = time.monotonic() - started
                    self._result_bytes[envelope.sender] = envelope_size(envelope)
                    version = self._statuses.get(envelope.sender, {}).get("data")
                    if isinstance(version, str) and len(version) == 64:
                        self._data_versions[envelope.sender] = version
                    self._emit(
                        Event(
                            "result",
                            epoch,
                            node=envelope.sender,
                            received=len(results),
                            expected=len(self.participants),
                        )
                    )
        if len(results) < self.quorum:
            missing = [self._gone.text(n) for n in self.participants if n not in results]
            raise RunTimeout(
                f"epoch {epoch}: only {len(results)} of {len(self.participants)} nodes answered "
                f"within {self.epoch_timeout:g} s (missing: {', '.join(missing)}); quorum is "
                f"{self.quorum}"
            )
        if len(results) < len(self.participants):
            missing = [self._gone.text(n) for n in self.participants if n not in results]
            log.warning("epoch %d continues with quorum; missing: %s", epoch, ", ".join(missing))
        self._absent = self._gone.absent(results)
        return {node: results[node] for node in sorted(results)}

    def _aggregate_parameters(self, results: dict[str, Any], epoch: int, previous: Any) -> Any:
        self.context.epoch = epoch
        results = {node: reveal_suppressed(result) for node, result in results.items()}
        if not isinstance(self.secure_sum, SecureSummer):  # masking binds the run's id
            self.secure_sum.run_id = self.run_id
            self.secure_sum.presence = Liveness(  # a node gone mid-round is not waited for
                self._is_status_or_error, self._note_presence, self._online.__contains__
            )
        results = self.secure_sum(results, epoch)
        value = self._call("aggregate", epoch, results, previous=previous)
        value, central = self.central.release(value, epoch)  # before anything sees it
        if central is not None:
            self._privacy[self.transport.node_id] = central.report()
        return value

    def _converged(self, value: Any, previous: Any, epoch: int) -> bool:
        if self.functions.converged is None:
            return False
        return bool(self._call("converged", epoch, value, previous=previous))

    def _call(self, name: str, epoch: int, first: Any, **kwargs: Any) -> Any:
        """Run one of the analyst's functions; its exception becomes the run's reason."""
        function = getattr(self.functions, name)
        try:
            with active(self.context):
                return function(first, epoch=epoch, **kwargs)
        except Exception as exc:
            raise RunFailed(
                f"{name} failed in epoch {epoch}: {describe_exception(exc, self.secrets)}"
                + _unsummed_hint(exc, first),
                node=self.transport.node_id,
                epoch=epoch,
            ) from exc

    def _send_parameters(self, epoch: int, value: Any) -> None:
        """Send the aggregate of `epoch`; the nodes start epoch + 1 from it."""
        self._kickoff = (
            "aggregate",
            epoch,
            {"value": value, "converged": False, "run": self.run_id},
        )
        self._broadcast(*self._kickoff, confirm_later=True)

    # --- helpers -----------------------------------------------------------------------------
    def _is_protocol(self, envelope: Envelope) -> bool:
        return envelope.kind in ("status", "error", "result") or self._is_logs(envelope)

    def _status(self, state: str, epoch: int = -1, **extra: Any) -> dict[str, Any]:
        status = {
            "state": state,
            "role": "aggregation",
            "session": self.session,
            **({"code": self.code} if self.code else {}),
            "run": self.run_id,
            "epoch": epoch,
            "time": time.time(),
            **extra,
        }
        return status

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception as exc:  # a broken display must not break the run
                log.warning("progress handler failed: %s", exc)

    def epoch_so_far(self) -> EpochRecord | None:
        """The epoch in progress as far as it got (who answered, arrivals, privacy spends):
        a failed run's report shows it, since no record of it was finished."""
        if self._epoch < 0:
            return None
        answered = sorted(self._arrivals)
        return EpochRecord(
            epoch=self._epoch,
            nodes=answered,
            missing=[n for n in self.participants if n not in self._arrivals],
            started=0.0,
            duration=0.0,
            converged=False,
            arrivals=dict(self._arrivals),
            privacy=dict(self._privacy),
            result_bytes=dict(self._result_bytes),
        )


def _unsummed_hint(exc: Exception, results: Any) -> str:
    """Why `results.secure[path]` has no value when its secure sum left the field out (too
    few nodes sealed it): a bare KeyError would not say."""
    key = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
    contributors = getattr(results, "contributors", None)
    secure = getattr(results, "secure", None)
    if not isinstance(key, str) or not isinstance(contributors, dict):
        return ""
    if contributors.get(key) != [] or (isinstance(secure, dict) and key in secure):
        return ""
    return (
        f" (the secure field {key!r} was not summed this epoch: fewer nodes than the masking "
        "threshold sealed it, so results.secure has no value for it and "
        f"results.contributors[{key!r}] is empty; the aggregator's log names who sealed it)"
    )

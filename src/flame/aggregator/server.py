"""The aggregation node: drives the epochs of the star protocol.

presence -> for each epoch: send the kick-off, await results (all, or quorum at the
deadline), aggregate, decide convergence, checkpoint -> finished. Every wait has a deadline;
a failing node aborts the run for everyone with that node's reason.

Every kick-off names a run id. A restarted aggregator learns where the run stands from the
nodes' retained statuses (run id, epoch): with a checkpoint, or while the nodes are still in
epoch 0, it continues the nodes' run (they re-send cached results); otherwise, having lost the
previous aggregate, it starts the analysis over under a new run id, which the nodes accept.
Results are acknowledged end to end (`ack`), and a node whose broker session was lost (its
status' `link` count changed) is sent the current kick-off again. Any stop other than a
finished run (a failure, SIGINT/SIGTERM) sends every node an abort with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from flame.aggregator.fanout import Fanout
from flame.aggregator.honesty import warn_if_dishonest
from flame.aggregator.membership import Gone, Instances, code_problem, missing_text
from flame.aggregator.records import (
    Checkpoint,
    EpochRecord,
    Event,
    EventSink,
    RunResult,
    RunStore,
    numeric_summary,
)
from flame.analysis.functions import AnalysisFunctions
from flame.errors import (
    ConfigError,
    NotAcknowledged,
    RunFailed,
    RunTimeout,
    TransportError,
    stop_signal,
)
from flame.node.context import Context, active
from flame.node.log_forward import LOG_CATEGORY, MAX_LINE
from flame.node.mailbox import Mailbox
from flame.node.status_board import STATUS_INTERVAL, StatusBoard
from flame.privacy.disclosure import reveal_suppressed, unwrap_release
from flame.privacy.tracebacks import trim_traceback_text
from flame.secure.fields import SecureKeys
from flame.secure.summer import SecureSummer
from flame.transport.base import Delivery, Transport
from flame.utils import logs as _logging

if TYPE_CHECKING:  # masking loads only for FLAME_SECURE__SCHEME=masking
    from flame.secure.masking import MaskingSettings
    from flame.secure.masking_sum import MaskingSummer
from flame.utils.deadline import Deadline
from flame.utils.printable import escape_controls
from flame.utils.public_reason import public_reason
from flame.utils.redact import describe_exception, redact
from flame.wire.envelope import EVERYONE, Envelope, Kind, encode_parts

__all__ = ["Aggregator"]

log = logging.getLogger(__name__)
node_log = logging.getLogger("flame.node_logs")  # lines the nodes forwarded (policy)

NOT_PARTICIPANT = "not_participant"  # an abort's code (the analysis client's constant)
_SEND_TIMEOUT = 5.0  # seconds for an abort or ack: a dead broker must not delay the exit
_KEPT_LOG_LINES = 500  # forwarded node log lines kept with the run (storage), latest
_LOG_SAVE_EVERY = 5.0  # seconds between writes of the forwarded lines to storage
_ACK_DELAY = 0.2  # seconds a result waits for its epoch to complete before an explicit ack
_FAREWELL = 5.0  # seconds to see the nodes take `finished` (re-sent after a lost session)
_SETTLE_SLACK = 0.25  # seconds beyond the status interval for a node's last status to arrive
_DELIVERY_POLL = 0.05  # seconds between looks at whether the broker accepted the kick-off


class Aggregator:
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
        self.secrets = list(secrets)
        if keys is not None and keys.private_key is not None:
            raise ConfigError(
                "the aggregation node must not hold the private key of secure aggregation"
            )
        self.mailbox = Mailbox(transport)
        self.code = code  # SHA-256 of the analysis code: every node must announce the same
        self._instances = Instances()
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
        self._sessions: dict[str, str] = {}  # node -> "process session:broker link"
        self._processes: dict[str, str] = {}  # node -> process session seen in this run
        self._statuses: dict[str, dict[str, Any]] = {}
        self._online: set[str] = set()
        # Under a quorum: nodes known gone (last will, failed status, error report, policy
        # refusal) and why. They hold no epoch; a new status of theirs brings them back.
        self._gone = Gone(self.participants, self.quorum)
        self._withheld: set[str] = set()  # nodes whose policy declines other sites' aggregates
        roster = transport.auth.roster if transport.auth is not None else None
        self._fanout = Fanout(self.participants, roster)  # broadcast or a copy each
        self._told: set[str] = set()
        self._kickoff: tuple[Kind, int, Any] | None = None
        self._epoch = -1
        self.run_id: str | None = None
        self._unacked: list[tuple[float, Envelope]] = []  # (due, result) acks not sent yet
        self._late_acks: threading.Timer | None = None  # acks for a slow aggregate (see below)
        self._delivery: Delivery | None = None  # the kick-off until the broker accepted it all
        self._logs: deque[str] = deque(maxlen=_KEPT_LOG_LINES)
        self._logs_saved = 0.0  # monotonic time of the last write to storage
        self._logs_new = False  # lines arrived since then
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
        self._choose_run(resuming=checkpoint is not None)
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
                self.store.save_checkpoint(Checkpoint(epoch + 1, value, [*history, record]))
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
    def _choose_run(self, *, resuming: bool) -> None:
        """Continue the nodes' run where that is sound, else start over under a new run id.

        Sound: resuming from a checkpoint (the aggregate the nodes need is in it), or every
        node still in epoch 0 (their cached results are all we need). A run whose nodes are
        past epoch 0 while this aggregator has no checkpoint lost the previous aggregate with
        the previous aggregator process: computing it again from epoch 0 is the only way.
        """
        if not resuming and any(s.get("run") for s in self._statuses.values()):
            self._settle_statuses()
        statuses = {n: s for n, s in self._statuses.items() if n in self._online}
        runs = Counter(s["run"] for s in statuses.values() if isinstance(s.get("run"), str))
        ahead = sorted(
            node
            for node, s in statuses.items()
            if isinstance(s.get("run"), str) and isinstance(s.get("epoch"), int) and s["epoch"] > 0
        )
        if runs and (resuming or not ahead):
            self.run_id = runs.most_common(1)[0][0]
            log.info("continuing run %s of the nodes", self.run_id)
            return
        self.run_id = uuid.uuid4().hex[:16]
        if ahead:
            furthest = max(int(statuses[node]["epoch"]) for node in ahead)
            log.warning(
                "nodes are in epoch %d of run %s, but this aggregator has no checkpoint (no "
                "storage): starting the analysis over as run %s",
                furthest,
                runs.most_common(1)[0][0],
                self.run_id,
            )

    def _settle_statuses(self) -> None:
        """Read statuses until none has come for a status interval (plus slack): a node's
        routine status may wait that long in its board (`status_board`), and where the nodes
        stand must not be judged from one they have already left behind (nodes seemingly in
        epoch 0 but past it would be sent epoch 0 of their run again and never answer)."""
        quiet = STATUS_INTERVAL + _SETTLE_SLACK
        deadline = Deadline(8 * quiet)
        while not deadline.passed():
            wait = Deadline(min(quiet, deadline.left()))
            envelope = self.mailbox.next(self._is_status_or_error, wait)
            if envelope is None:
                return
            self._note_presence(envelope)

    def _await_farewell(self, answered: set[str]) -> None:
        """Briefly see the nodes take `finished`; one whose broker session was lost meanwhile
        gets it again (see `_note_status`). Stragglers still computing are not waited for;
        a node that `answered` the last epoch is, whatever its (coalesced) status last said:
        its statuses must not outlive this process in the broker session, where the next
        aggregator process of this analysis would read them as current."""
        deadline = Deadline(min(_FAREWELL, self.epoch_timeout))
        while not deadline.passed():
            waiting = [
                node
                for node in self.participants
                if node in self._online
                and (state := self._statuses.get(node, {}).get("state")) not in ("done", "failed")
                and (state != "computing" or node in answered)
            ]
            if not waiting:
                return
            envelope = self.mailbox.next(self._is_status_or_error, deadline)
            if envelope is None:
                return
            if envelope.kind == "message":
                self._note_logs(envelope)
            elif envelope.kind == "status":
                with contextlib.suppress(RunFailed):
                    self._note_status(envelope, rejoin_epoch=self._kickoff_epoch())

    def _kickoff_epoch(self) -> int | None:
        return None if self._kickoff is None else self._kickoff[1]

    def _await_presence(self) -> None:
        """Wait for every participant, or for quorum when the presence deadline passes."""
        deadline = Deadline(self.presence_timeout)
        self._emit(Event("waiting", expected=len(self.participants)))
        while len(self._online) < len(self.participants):
            envelope = self.mailbox.next(self._is_status_or_error, deadline)
            if envelope is None:
                break
            self._note_presence(envelope)
        if len(self._online) < self.quorum:
            missing = [n for n in self.participants if n not in self._online]
            raise RunTimeout(
                f"only {len(self._online)} of {len(self.participants)} nodes came online within "
                f"{self.presence_timeout:g} s (missing: "
                f"{missing_text(missing, self.transport.stale_by_node)}); quorum is "
                f"{self.quorum}"
            )

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
            if not self._kickoff_accepted(wait=False):  # look again soon
                wait = Deadline(min(wait.left(), _DELIVERY_POLL))
            envelope = self.mailbox.next(self._is_protocol, wait)
            if envelope is None:
                if not deadline.passed():
                    self._send_acks()
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
                elif envelope.category is not None and envelope.category != self.run_id:
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
                    self._result_bytes[envelope.sender] = _size(envelope)
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
        results = self.secure_sum(results, epoch)
        return self._call("aggregate", epoch, results, previous=previous)

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
                f"{name} failed in epoch {epoch}: {describe_exception(exc, self.secrets)}",
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
    def _broadcast(self, kind: Kind, epoch: int, body: Any, *, confirm_later: bool = False) -> None:
        """To every participant; control bodies name this process (`session`), so a node
        can tell them from leftovers of an earlier aggregator process in its broker session.
        A kick-off is confirmed while the results come in (`confirm_later`), not before."""
        if self._late_acks is not None:
            self._late_acks.cancel()  # the kick-off (or end) acknowledges the results
            self._late_acks = None
        self._kickoff_accepted(wait=True)  # the previous one first
        listening = self._fanout.listeners(self._withheld)
        envelopes = [
            self._envelope(node, kind, epoch, body)
            for node in self.participants
            if node not in listening
        ]
        try:
            delivery = self.transport.dispatch(envelopes)
            if listening:
                everyone = self._envelope(EVERYONE, kind, epoch, body)
                delivery += self.transport.broadcast(everyone, listening)
            elif isinstance(body, dict) and self._fanout.probe_now(kind):
                probe = {**body, "probe": True}  # nodes it reaches say so in their statuses
                self.transport.probe_broadcast(self._envelope(EVERYONE, kind, epoch, probe))
        except TypeError as exc:
            raise RunFailed(f"the aggregate of epoch {epoch} cannot be sent: {exc}") from exc
        self._delivery = delivery
        if not confirm_later:
            self._kickoff_accepted(wait=True)

    def _kickoff_accepted(self, *, wait: bool) -> bool:
        """Whether the broker accepted the last broadcast for every node (TransportError naming
        one it refused or did not acknowledge in time); `wait` for it, or just look."""
        if self._delivery is None:
            return True
        try:
            if wait:
                self._delivery.wait()
            elif not self._delivery.check():
                return False
        except NotAcknowledged as exc:
            # Not a refusal: the broker is out of reach. paho keeps the messages queued and
            # sends them after a reconnect; the epoch deadline, not this wait, ends the run.
            log.warning("kick-off not acknowledged yet; the broker will deliver it: %s", exc)
        self._delivery = None
        return True

    def _envelope(self, node: str, kind: Kind, epoch: int, body: Any) -> Envelope:
        if kind in ("start", "aggregate", "finished", "abort") and isinstance(body, dict):
            body = {**body, "session": self.session}
            if node in self._withheld and kind in ("aggregate", "finished") and "value" in body:
                body = {**body, "value": None, "withheld": True}  # share_aggregate = false
        return Envelope(self.transport.analysis_id, self.transport.node_id, node, kind, epoch, body)

    def _send(
        self, node: str, kind: Kind, epoch: int, body: Any, timeout: float | None = None
    ) -> None:
        envelope = self._envelope(node, kind, epoch, body)
        try:
            self.transport.send(envelope, timeout)
        except TypeError as exc:
            raise RunFailed(f"the aggregate of epoch {epoch} cannot be sent: {exc}") from exc

    def _acknowledge_later(self, envelope: Envelope) -> bool:
        """Acknowledge this result unless the epoch completes first (its kick-off or the end
        of the run tells the node as much): a fast epoch costs no extra messages. True."""
        self._unacked.append((time.monotonic() + _ACK_DELAY, envelope))
        return True

    def _acknowledge_if_slow(self) -> None:
        """The last results of an epoch are acknowledged by the next kick-off, unless
        aggregating takes longer than `_ACK_DELAY` (a secure sum's decryption takes minutes):
        then by an ack, so that nodes do not re-send their results meanwhile."""
        pending, self._unacked = [envelope for _, envelope in self._unacked], []
        if pending:
            self._late_acks = threading.Timer(_ACK_DELAY, self._acknowledge_all, (pending,))
            self._late_acks.daemon = True
            self._late_acks.start()

    def _acknowledge_all(self, envelopes: list[Envelope]) -> None:
        try:
            for envelope in envelopes:
                self._acknowledge(envelope)
        except Exception as exc:  # a timer thread: the node's re-send gets an ack later
            log.warning("could not acknowledge results: %s", type(exc).__name__)

    def _send_acks(self) -> None:
        """The acks that are due: results that have waited `_ACK_DELAY` for their epoch."""
        now = time.monotonic()
        while self._unacked and self._unacked[0][0] <= now:
            self._acknowledge(self._unacked.pop(0)[1])

    def _acknowledge(self, envelope: Envelope) -> bool:
        """Tell the node its result arrived (it re-sends until then); True, even if the ack
        cannot be sent now: the node's re-send will get another one."""
        body = {"ack": envelope.id, "epoch": envelope.epoch, "run": self.run_id}
        ack = Envelope(
            self.transport.analysis_id,
            self.transport.node_id,
            envelope.sender,
            "ack",
            envelope.epoch,
            body,
        )
        try:
            self.transport.post(ack)  # no wait for the broker: off the epoch's critical path
        except TransportError as exc:
            log.warning("could not acknowledge %s's result: %s", envelope.sender, exc)
        return True

    def _abort(self, reason: str, epoch: int, exc: BaseException | None = None) -> None:
        """Every node is told, then the retained status says `failed` after this process is
        gone: with the public reason only (who, epoch, exception type; every roster member
        reads statuses). The message and traceback stay in this log and the failure record."""
        public = public_reason(reason)
        body = {"reason": public, "run": self.run_id, "session": self.session}
        for node in self.participants:
            try:
                self._send(node, "abort", epoch, body, timeout=_SEND_TIMEOUT)
            except (TransportError, RunFailed) as send_exc:
                log.warning("could not tell %s to abort: %s", node, send_exc)
        extra: dict[str, Any] = {"reason": reason}
        traceback_text = getattr(exc, "traceback", None)
        if isinstance(traceback_text, str) and traceback_text:
            extra["traceback"] = traceback_text
        with contextlib.suppress(TransportError):
            self.board.now(self._status("failed", epoch, reason=public))
        self._save_logs()
        keep = getattr(self.store, "save_failure", None)
        if callable(keep):
            try:
                keep({"epoch": epoch, "node": getattr(exc, "node", None), **extra})
            except Exception as store_exc:  # the failure itself is what must be reported
                log.warning("could not keep the failure record in storage: %s", store_exc)

    def _fail_from(self, envelope: Envelope) -> None:
        if envelope.sender not in self.participants:
            log.warning("ignored an error report from %r, not a participant", envelope.sender)
            return
        body = envelope.body if isinstance(envelope.body, dict) else {}
        session = body.get("session")
        if isinstance(session, str) and self._processes.get(envelope.sender) != session:
            log.info("ignored an error report of an earlier process of %s", envelope.sender)
            return
        error = str(body.get("error", "unknown error"))[:500]
        stopped = body.get("stopped")
        if isinstance(stopped, str) and stopped:
            reason = f"node {envelope.sender!r} stopped: {stopped[:32]}"
        else:
            reason = f"node {envelope.sender!r} failed in epoch {envelope.epoch}: {error}"
        refused = body.get("refused") is True
        sender, process = envelope.sender, self._processes.get(envelope.sender)
        if refused and self._gone.note(sender, f"refused by its policy: {error}", process):
            return  # a refusal under a quorum: a missing answer, and no traceback was sent
        traceback_text = body.get("traceback")
        if isinstance(traceback_text, str) and traceback_text:
            traceback_text = trim_traceback_text(traceback_text, self.secrets)
        else:
            traceback_text = None
        shown = f"{reason}\n{traceback_text}" if traceback_text else reason
        if self._gone.note(sender, reason.removeprefix(f"node {sender!r} "), process):
            # under a quorum: a missing answer; said here, since no failure is printed for it
            log.warning("%s (a missing answer under the quorum)", shown)
            return
        log.error("%s", shown, extra={"run_failure": True})  # the CLI prints the failure once
        raise RunFailed(
            reason, node=envelope.sender, epoch=envelope.epoch, traceback=traceback_text
        )

    def _tell_outsider(self, node: str, body: dict[str, Any]) -> None:
        """A live analysis node that is not in our participant list is told so (it exits 2)
        rather than waiting for kick-offs that never come."""
        if node == self.transport.node_id or body.get("role") != "analysis":
            return
        if body.get("state") in ("offline", "done", "failed") or body.get("online") is False:
            return
        key = f"{node}:{body.get('session')}"
        if key in self._told:
            return
        self._told.add(key)
        listed = ", ".join(self.participants[:20]) + (
            ", ..." if len(self.participants) > 20 else ""
        )
        reason = (
            f"node {node!r} is not a participant of analysis {self.transport.analysis_id!r} "
            f"(the aggregator's participants: {listed})"
        )
        log.warning("%s; telling it", reason)
        try:
            self._send(
                node,
                "abort",
                self._epoch,
                {
                    "reason": reason,
                    "code": NOT_PARTICIPANT,
                    "run": self.run_id,
                    "session": self.session,
                },
                timeout=_SEND_TIMEOUT,
            )
        except (TransportError, RunFailed) as exc:
            log.warning("could not tell %s: %s", node, exc)

    def _note_status(self, envelope: Envelope, rejoin_epoch: int | None = None) -> None:
        node = envelope.sender
        body = envelope.body
        if not isinstance(body, dict):
            return
        if node not in self.participants:
            self._tell_outsider(node, body)
            return
        problem = self._instances.note(node, body) or code_problem(
            node, body, self.code, self.run_id or ""
        )
        if problem is not None:
            raise RunFailed(problem, node=node)
        state = body.get("state")
        session = body.get("session")
        if body.get("share_aggregate") is False:
            self._withheld.add(node)
        self._fanout.note(node, body)
        if state == "offline" or body.get("online") is False:
            if node in self._online:
                log.warning("node %s went offline", node)
            self._online.discard(node)
            if state == "offline":  # a last will (or a clean exit before the end)
                self._gone.note(node, "offline: its connection ended")
            return
        if state == "failed":
            self._online.discard(node)
            if isinstance(session, str) and self._processes.get(node) == session:
                # Its error report should have come first; the status is the backstop.
                reason = str(body.get("reason") or "failed")[:500]
                if self._gone.note(node, f"failed: {reason}", self._processes.get(node)):
                    return
                raise RunFailed(
                    f"node {node!r} {reason}"
                    if reason.startswith("stopped: ")
                    else f"node {node!r} failed: {reason}",
                    node=node,
                )
            return  # a failure of an earlier process of that node
        self._statuses[node] = body
        self._online.add(node)
        self._gone.back(node, session, body)
        if not isinstance(session, str):
            return
        key = f"{session}:{body.get('link', 0)}"
        if self._sessions.get(node) == key:
            return
        self._sessions[node] = key
        self._processes[node] = session
        if self._kickoff is not None and rejoin_epoch is not None:
            log.info("node %s (re)joined or lost its broker session; sending it again", node)
            self._send(node, *self._kickoff)

    def _note_presence(self, envelope: Envelope) -> None:
        """A status, error report or forwarded log lines, while no result is expected."""
        if envelope.kind == "message":
            self._note_logs(envelope)
        elif envelope.kind == "error":
            self._fail_from(envelope)  # raises unless from an earlier process or an outsider
        else:
            self._note_status(envelope)

    def _is_status_or_error(self, envelope: Envelope) -> bool:
        return envelope.kind in ("status", "error") or self._is_logs(envelope)

    def _is_protocol(self, envelope: Envelope) -> bool:
        return envelope.kind in ("status", "error", "result") or self._is_logs(envelope)

    def _is_logs(self, envelope: Envelope) -> bool:
        return envelope.kind == "message" and envelope.category == LOG_CATEGORY

    def _note_logs(self, envelope: Envelope) -> None:
        """A node's forwarded log lines: into this log and, with storage, kept with the run
        for `flame status --logs`. Never into the retained status: every roster member may
        read that (issue 21)."""
        body = envelope.body if isinstance(envelope.body, dict) else {}
        lines = body.get("lines")
        if envelope.sender not in self.participants or not isinstance(lines, list):
            return
        for line in lines[:200]:
            text = escape_controls(redact(str(line)[:MAX_LINE], self.secrets))
            node_log.info("[%s] %s", envelope.sender, text)
            self._logs.append(f"{envelope.sender}: {text}")
        self._logs_new = True
        if time.monotonic() - self._logs_saved >= _LOG_SAVE_EVERY:
            self._save_logs()  # else with a later batch, or at the end of the run

    def _save_logs(self) -> None:
        """New forwarded lines to storage (one attempt; a log must not stall the run)."""
        keep = getattr(self.store, "save_logs", None)
        if not self._logs_new or not callable(keep):
            return
        try:
            keep(list(self._logs))
        except Exception as exc:
            log.warning("could not keep the forwarded node logs in storage: %s", exc)
        self._logs_new, self._logs_saved = False, time.monotonic()

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


def _size(envelope: Envelope) -> int:
    """Bytes of a message in flame's wire encoding (its arrays are not copied): as received
    when known, else encoded again."""
    if envelope.wire_bytes is not None:
        return envelope.wire_bytes
    try:
        return sum(memoryview(part).nbytes for part in encode_parts(envelope))
    except (TypeError, ValueError):
        return 0

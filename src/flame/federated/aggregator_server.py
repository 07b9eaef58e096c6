"""The aggregation node: drives the epochs of the star protocol.

presence -> for each epoch: send the kick-off, await results (all, or quorum at the
deadline), aggregate, decide convergence, checkpoint -> finished. Every wait has a deadline;
a failing node aborts the run for everyone with that node's reason.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from flame import _logging
from flame._deadline import Deadline
from flame._redact import describe_exception
from flame.disclosure import reveal_suppressed
from flame.errors import ConfigError, RunFailed, RunTimeout, TransportError
from flame.federated.context import Context, active
from flame.federated.functions import AnalysisFunctions
from flame.federated.honesty import warn_if_dishonest
from flame.federated.mailbox import Mailbox
from flame.federated.records import (
    Checkpoint,
    EpochRecord,
    Event,
    EventSink,
    RunResult,
    RunStore,
    numeric_summary,
)
from flame.federated.secure import SecureKeys, SecureSummer
from flame.messages import Envelope, Kind, encode_parts
from flame.transport.base import Transport

__all__ = ["Aggregator"]

log = logging.getLogger(__name__)


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
        self.secure_sum = SecureSummer(
            keys, epoch_timeout, self.context, None if keys is None else keys.confirm_fraction
        )
        self._sessions: dict[str, str] = {}
        self._online: set[str] = set()
        self._kickoff: tuple[Kind, int, Any] | None = None
        self._arrivals: dict[str, float] = {}
        self._result_bytes: dict[str, int] = {}

    # --- the run -----------------------------------------------------------------------------
    def execute(self) -> RunResult:
        """Run every epoch and return the final result; raise RunFailed/RunTimeout otherwise."""
        self.transport.connect(self._status("waiting"))
        self.transport.watch(self.participants)
        try:
            return self._execute()
        except (RunFailed, RunTimeout, ConfigError) as exc:
            self._abort(str(exc), getattr(exc, "epoch", None) or -1)
            self._emit(Event("failed", detail=str(exc)))
            raise
        except Exception as exc:
            reason = f"aggregator failed: {describe_exception(exc, self.secrets)}"
            self._abort(reason, -1)
            self._emit(Event("failed", detail=reason))
            raise RunFailed(reason, node=self.transport.node_id) from exc
        finally:
            _logging.set_epoch(None)
            self.transport.close()

    def _execute(self) -> RunResult:
        finished = self.store.load_final() if self.store is not None else None
        if finished is not None:
            log.warning(
                "analysis %s already finished; announcing its stored result", finished.analysis_id
            )
            self._announce_final(finished)
            return finished
        checkpoint = self.store.load_checkpoint() if self.store is not None else None
        history: list[EpochRecord] = list(checkpoint.history) if checkpoint else []
        previous: Any = checkpoint.previous if checkpoint else None
        first = checkpoint.next_epoch if checkpoint else 0
        if checkpoint:
            log.info("resuming from checkpoint: next epoch %d", first)
        self._await_presence()
        if first == 0:
            self._kickoff = ("start", 0, {"previous": None})
        else:
            self._kickoff = ("aggregate", first - 1, {"value": previous, "converged": False})
        self._broadcast(*self._kickoff)
        value: Any = previous
        converged = False
        for epoch in range(first, self.epochs):
            _logging.set_epoch(epoch)
            started = time.time()
            received, sent = self.transport.bytes_received, self.transport.bytes_sent
            last_epoch = {"last_epoch": history[-1].to_dict(summary=False)} if history else {}
            self.transport.announce(self._status("collecting", epoch, **last_epoch))
            self._emit(Event("epoch_started", epoch, expected=len(self.participants)))
            results = self._await_parameters(epoch)
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
                result_bytes=dict(self._result_bytes),
                summary=numeric_summary(value),
            )
            last = converged or epoch + 1 == self.epochs
            if not last:
                self._send_parameters(epoch, value)
                record = replace(record, bytes_sent=self.transport.bytes_sent - sent)
            history.append(record)
            self._emit(Event("epoch_finished", epoch, record=record, received=len(results)))
            if last:
                break
            if self.store is not None:
                self.store.save_checkpoint(Checkpoint(epoch + 1, value, list(history)))
            previous = value
        warn_if_dishonest(value, converged, self.functions.converged is not None, self.epochs)
        result = RunResult(
            self.transport.analysis_id, value, converged, len(history), list(history)
        )
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
        }
        self._broadcast("finished", last, body)
        self.transport.announce(
            self._status(
                "done",
                last,
                location=result.location,
                last_epoch=result.history[-1].to_dict(summary=False) if result.history else None,
            )
        )
        self._emit(Event("finished", last, detail=result.location or ""))

    # --- the protocol steps ------------------------------------------------------------------
    def _await_presence(self) -> None:
        """Wait for every participant, or for quorum when the presence deadline passes."""
        deadline = Deadline(self.presence_timeout)
        self._emit(Event("waiting", expected=len(self.participants)))
        while len(self._online) < len(self.participants):
            envelope = self.mailbox.next(self._is_status_or_error, deadline)
            if envelope is None:
                break
            if envelope.kind == "error":
                self._fail_from(envelope)
            self._note_status(envelope)
        if len(self._online) < self.quorum:
            missing = [n for n in self.participants if n not in self._online]
            raise RunTimeout(
                f"only {len(self._online)} of {len(self.participants)} nodes came online within "
                f"{self.presence_timeout:g} s (missing: {', '.join(missing)}); quorum is "
                f"{self.quorum}"
            )

    def _await_parameters(self, epoch: int) -> dict[str, Any]:
        """Collect this epoch's results: each node counted once, old epochs ignored."""
        deadline = Deadline(self.epoch_timeout)
        started = time.monotonic()
        results: dict[str, Any] = {}
        self._arrivals, self._result_bytes = {}, {}  # for the epoch record (reports)
        while len(results) < len(self.participants):
            envelope = self.mailbox.next(self._is_protocol, deadline)
            if envelope is None:
                break
            if envelope.kind == "status":
                self._note_status(
                    envelope, rejoin_epoch=None if envelope.sender in results else epoch
                )
            elif envelope.kind == "error":
                self._fail_from(envelope)
            elif envelope.kind == "result":
                if envelope.sender not in self.participants:
                    log.warning("ignored a result from %r, not a participant", envelope.sender)
                elif envelope.epoch != epoch:
                    log.info("ignored %s's result for epoch %d", envelope.sender, envelope.epoch)
                elif envelope.sender in results:
                    log.info("ignored a second result from %s in epoch %d", envelope.sender, epoch)
                else:
                    results[envelope.sender] = envelope.body
                    self._arrivals[envelope.sender] = time.monotonic() - started
                    self._result_bytes[envelope.sender] = _size(envelope)
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
            missing = [n for n in self.participants if n not in results]
            raise RunTimeout(
                f"epoch {epoch}: only {len(results)} of {len(self.participants)} nodes answered "
                f"within {self.epoch_timeout:g} s (missing: {', '.join(missing)}); quorum is "
                f"{self.quorum}"
            )
        if len(results) < len(self.participants):
            missing = [n for n in self.participants if n not in results]
            log.warning("epoch %d continues with quorum; missing: %s", epoch, ", ".join(missing))
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
        self._kickoff = ("aggregate", epoch, {"value": value, "converged": False})
        self._broadcast(*self._kickoff)

    # --- helpers -----------------------------------------------------------------------------
    def _broadcast(self, kind: Kind, epoch: int, body: Any) -> None:
        for node in self.participants:
            self._send(node, kind, epoch, body)

    def _send(self, node: str, kind: Kind, epoch: int, body: Any) -> None:
        envelope = Envelope(
            self.transport.analysis_id, self.transport.node_id, node, kind, epoch, body
        )
        try:
            self.transport.send(envelope)
        except TypeError as exc:
            raise RunFailed(f"the aggregate of epoch {epoch} cannot be sent: {exc}") from exc

    def _abort(self, reason: str, epoch: int) -> None:
        for node in self.participants:
            try:
                self._send(node, "abort", epoch, {"reason": reason})
            except (TransportError, RunFailed) as exc:
                log.warning("could not tell %s to abort: %s", node, exc)
        with contextlib.suppress(TransportError):
            self.transport.announce(self._status("failed", epoch, reason=reason))

    def _fail_from(self, envelope: Envelope) -> None:
        if envelope.sender not in self.participants:
            log.warning("ignored an error report from %r, not a participant", envelope.sender)
            return
        body = envelope.body if isinstance(envelope.body, dict) else {}
        error = str(body.get("error", "unknown error"))[:500]
        raise RunFailed(
            f"node {envelope.sender!r} failed in epoch {envelope.epoch}: {error}",
            node=envelope.sender,
            epoch=envelope.epoch,
        )

    def _note_status(self, envelope: Envelope, rejoin_epoch: int | None = None) -> None:
        node = envelope.sender
        if node not in self.participants or not isinstance(envelope.body, dict):
            return
        state = envelope.body.get("state")
        session = envelope.body.get("session")
        if state == "offline":
            if node in self._online:
                log.warning("node %s went offline", node)
            self._online.discard(node)
            return
        self._online.add(node)
        if not isinstance(session, str) or self._sessions.get(node) == session:
            return
        self._sessions[node] = session
        if self._kickoff is not None and rejoin_epoch is not None:
            log.info("node %s (re)joined; sending it epoch %d", node, rejoin_epoch)
            self._send(node, *self._kickoff)

    def _is_status_or_error(self, envelope: Envelope) -> bool:
        return envelope.kind in ("status", "error")

    def _is_protocol(self, envelope: Envelope) -> bool:
        return envelope.kind in ("status", "error", "result")

    def _status(self, state: str, epoch: int = -1, **extra: Any) -> dict[str, Any]:
        return {
            "state": state,
            "role": "aggregation",
            "session": self.session,
            "epoch": epoch,
            "time": time.time(),
            **extra,
        }

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception as exc:  # a broken display must not break the run
                log.warning("progress handler failed: %s", exc)


def _size(envelope: Envelope) -> int:
    """Bytes of a message in flame's wire encoding (its arrays are not copied)."""
    try:
        return sum(memoryview(part).nbytes for part in encode_parts(envelope))
    except (TypeError, ValueError):
        return 0

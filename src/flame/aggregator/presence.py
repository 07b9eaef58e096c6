"""Who is there: the participants' presence, processes and broker sessions, from their statuses.

A part of `Aggregator` (`flame.aggregator.server`), kept apart so that the epoch loop reads as
one: the wait for the nodes to come online, the choice of the run to continue from their
retained statuses, each status noted (offline, failed, back, a new broker session that gets
the kick-off again, an outsider told it is not a participant) and the farewell after the last
epoch. The per-node bookkeeping underneath is `membership` (instances, the gone of a quorum).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

from flame.aggregator.membership import Gone, Instances, code_problem, missing_text
from flame.aggregator.records import Event
from flame.aggregator.sending import SEND_TIMEOUT
from flame.errors import RunFailed, RunTimeout, TransportError
from flame.node.status_board import STATUS_INTERVAL
from flame.transport.status_order import CLOCK_SKEW
from flame.utils.deadline import Deadline
from flame.wire.envelope import Envelope, Kind

if TYPE_CHECKING:
    from flame.aggregator.fanout import Fanout
    from flame.node.mailbox import Mailbox
    from flame.transport.base import Transport

__all__ = ["NOT_PARTICIPANT", "Presence"]

log = logging.getLogger(__name__)

NOT_PARTICIPANT = "not_participant"  # an abort's code (the analysis client's constant)
_FAREWELL = 5.0  # seconds to see the nodes take `finished` (re-sent after a lost session)
_SETTLE_SLACK = 0.25  # seconds beyond the status interval for a node's last status to arrive
_RESEND_EVERY = 2.0  # seconds: at most one kick-off re-sent to a node per this interval


class Presence:
    """The aggregator's view of who is online, in which process, and who is gone."""

    # the aggregator's, used here
    participants: list[str]
    quorum: int
    code: str | None
    run_id: str | None
    session: str
    transport: Transport
    mailbox: Mailbox
    presence_timeout: float
    epoch_timeout: float
    _kickoff: tuple[Kind, int, Any] | None
    _epoch: int
    _fanout: Fanout

    if TYPE_CHECKING:

        def _send(
            self, node: str, kind: Kind, epoch: int, body: Any, timeout: float | None = None
        ) -> None: ...
        def _emit(self, event: Event) -> None: ...
        def _fail_from(self, envelope: Envelope) -> None: ...
        def _note_logs(self, envelope: Envelope) -> None: ...
        def _is_logs(self, envelope: Envelope) -> bool: ...

    def _init_presence(self) -> None:
        self._instances = Instances()
        self._sessions: dict[str, tuple[str, int]] = {}  # node -> (process session, link)
        self._resent: dict[str, float] = {}  # node -> monotonic time the kick-off went again
        self._owed: dict[str, tuple[str, int]] = {}  # re-sends held back by `_RESEND_EVERY`
        self._processes: dict[str, str] = {}  # node -> process session seen in this run
        self._statuses: dict[str, dict[str, Any]] = {}
        self._online: set[str] = set()
        # Under a quorum: nodes known gone (last will, failed status, error report, policy
        # refusal) and why. They hold no epoch; a new status of theirs brings them back.
        self._gone = Gone(self.participants, self.quorum)
        self._withheld: set[str] = set()  # nodes whose policy declines other sites' aggregates
        self._told: set[str] = set()

    def _choose_run(self, *, resuming: bool, run: str | None = None) -> None:
        """The run id of this aggregator process's kick-offs; a result counts only under it.

        Without a checkpoint every aggregator process names a run of its own (a fresh random
        id): a status is its node's own word, and a run id taken from one (a member naming an
        earlier run while the honest nodes name none yet) let the broker operator's replay of
        an honest node's signed result of that run count as its answer (threat-model.md,
        *Replays*). Nodes still in epoch 0 send their cached result again under the new id
        (`flame.node.instructions`); nodes past it lost the previous aggregate with the
        previous aggregator process and compute again from epoch 0.

        Resuming from a checkpoint, the checkpoint's own run (`run`, signed into it) is
        continued, and only when at least a quorum of participants name it in statuses signed
        since this process started (give or take `CLOCK_SKEW`) and none names another: a
        status is signed whenever it was sent, and retained ones of an earlier run replayed
        by the broker operator once made a checkpoint continue that run, its replayed results
        counting. Otherwise this process names a run of its own, and the nodes compute the
        checkpoint's next epoch again from its aggregate.
        """
        if not resuming and any(s.get("run") for s in self._statuses.values()):
            self._settle_statuses()  # to say truly where the nodes stand
        statuses = {n: s for n, s in self._statuses.items() if n in self._online}
        runs = Counter(s["run"] for s in statuses.values() if isinstance(s.get("run"), str))
        ahead = sorted(
            node
            for node, s in statuses.items()
            if isinstance(s.get("run"), str) and isinstance(s.get("epoch"), int) and s["epoch"] > 0
        )
        signed_since = self.transport.since - CLOCK_SKEW
        fresh = sum(
            1
            for s in statuses.values()
            if s.get("run") == run
            and isinstance(s.get("at"), (int, float))
            and s["at"] >= signed_since
        )
        if resuming and run is not None and set(runs) == {run} and fresh >= self.quorum:
            self.run_id = run
            log.info("continuing run %s of the checkpoint and the nodes", self.run_id)
            return
        self.run_id = uuid.uuid4().hex[:16]
        if ahead and not resuming:
            furthest = max(int(statuses[node]["epoch"]) for node in ahead)
            log.warning(
                "nodes are in epoch %d of run %s, but this aggregator has no checkpoint (no "
                "storage): starting the analysis over as run %s",
                furthest,
                runs.most_common(1)[0][0],
                self.run_id,
            )
        elif runs:
            named = ", ".join(
                f"{node} ({s['run']})" for node, s in sorted(statuses.items()) if s.get("run")
            )
            log.info(
                "this is run %s; the nodes named %s%s",
                self.run_id,
                named,
                " (a checkpoint's run is continued only when at least a quorum of participants"
                " name it in statuses signed since this process started and none names another)"
                if resuming
                else " (nodes in epoch 0 send their result again under this run)",
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
                timeout=SEND_TIMEOUT,
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
            if node in self._online and state != "done":  # "done": a finished node's goodbye
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
        link = body.get("link", 0)
        link = link if isinstance(link, int) and not isinstance(link, bool) else 0
        known = self._sessions.get(node)
        if known is not None and known[0] == session and link <= known[1]:
            return  # not a new broker session: a status's word alone buys no re-send
        self._processes[node] = session
        if self._kickoff is None or rejoin_epoch is None:
            self._sessions[node] = (session, link)
            self._owed.pop(node, None)
            return
        self._owed[node] = (session, link)
        self.resend_owed()

    def resend_owed(self) -> None:
        """The current kick-off again to nodes with a new broker session, at most once per
        `_RESEND_EVERY` each: a member flapping its `link` must not buy a whole aggregate
        per status. One held back goes when its interval is over (the epoch loop calls)."""
        now = time.monotonic()
        for node, key in list(self._owed.items()):
            if self._kickoff is None or now - self._resent.get(node, -1e9) < _RESEND_EVERY:
                continue
            del self._owed[node]
            self._sessions[node], self._resent[node] = key, now
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

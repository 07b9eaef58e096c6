"""Who speaks for a node: one process per node id, all running the same analysis code.

Every status carries the sending process's random `instance` id (signed with the node's
identity, so nobody else can fake one). A restart is one instance followed by another; two
live processes with one node id show up as instances that alternate (they take the broker
session from each other in turns), or as an explicit `conflict` status from the process
that lost the session (`flame.transport.mqtt`). Either is a fault that stops the run.
What reaches `Instances` has passed `flame.transport.status_order`: a replayed status of an
earlier process (of this run or an earlier one) never does, so it cannot fake either.
"""

from __future__ import annotations

import logging
from typing import Any

from flame.errors import RunFailed

__all__ = ["Gone", "Instances", "code_problem", "missing_text"]

log = logging.getLogger(__name__)


def _gone(body: dict[str, Any]) -> bool:
    """A status of a process that is ending or gone (offline, farewell, done, failed): it may
    arrive after the next instance's first status (a last will, a queued leftover)."""
    return body.get("state") in ("offline", "done", "failed") or body.get("online") is False


def missing_text(missing: list[str], stale: dict[str, int]) -> str:
    """Missing nodes, each with how many of its statuses were ignored as stale: such a node
    may be live, its statuses taken for an earlier process's (see status_order)."""
    return ", ".join(
        f"{node} ({stale[node]} status(es) of it ignored as stale: see the warnings above)"
        if stale.get(node)
        else node
        for node in missing
    )


class Instances:
    """The current process of each node, and the ones it replaced."""

    def __init__(self) -> None:
        self._current: dict[str, str] = {}
        self._earlier: dict[str, set[str]] = {}

    def current(self, node: str) -> str | None:
        return self._current.get(node)

    def note(self, node: str, body: dict[str, Any]) -> str | None:
        """Record a (verified) status of `node`; the reason to stop the run, if any."""
        conflict = body.get("conflict")
        if isinstance(conflict, str):
            current = self._current.get(node)
            names = [conflict] + ([current] if current and current != conflict else [])
            return f"two processes claim node {node!r} (instances {', '.join(names)})"
        instance = body.get("instance")
        if not isinstance(instance, str) or _gone(body):
            return None
        current = self._current.get(node)
        if current is None or current == instance:
            self._current[node] = instance
            return None
        earlier = self._earlier.setdefault(node, set())
        if instance in earlier:  # an instance came back after another one: both are alive
            return f"two processes claim node {node!r} (instances {current}, {instance})"
        earlier.add(current)
        self._current[node] = instance
        return None


class Gone:
    """Under a quorum: the participants known to be gone, and why (a last will, a failed
    status or error report, a policy refusal). They hold no epoch: it ends as soon as the
    quorum answered and every other participant is gone. Without a quorum (all must answer)
    nobody is ever taken for gone here; the aggregator's own rules apply."""

    def __init__(self, participants: list[str], quorum: int) -> None:
        self.participants = participants
        self.quorum = quorum
        self._why: dict[str, str] = {}
        self._process: dict[str, str] = {}  # node -> the process that failed or refused
        self._latest: dict[str, tuple[str, int]] = {}  # node -> (instance, seq) last seen
        self._ended: dict[str, tuple[str, int]] = {}  # node -> its latest when it went

    def __contains__(self, node: object) -> bool:
        return node in self._why

    def note(self, node: str, reason: str, process: str | None = None) -> bool:
        """`node` is gone (True; False without a quorum). With its `process` (a failure or a
        refusal) only a new process of it is back; otherwise any later status is. The first
        reason stays: the error report or refusal says more than the status after it."""
        if self.quorum >= len(self.participants):
            return False
        if node in self._why:
            return True
        log.warning("node %s is gone (%s); the epochs go on with the quorum", node, reason)
        self._why[node] = reason
        if node in self._latest:
            self._ended[node] = self._latest[node]
        if process is not None:
            self._process[node] = process
        return True

    def back(self, node: str, session: Any, status: dict[str, Any] | None = None) -> None:
        """A status of `node` that is not a goodbye: back, unless of the process that ended,
        or of the process that went (its will) with no higher `seq` than before it went: a
        live process re-signs its status on reconnect; a replay of its last one cannot."""
        instance, seq = (status or {}).get("instance"), (status or {}).get("seq")
        mark = (instance, seq) if type(instance) is str and type(seq) is int else None
        if node not in self._why:
            if mark is not None:
                self._latest[node] = mark
            return
        ended = self._process.get(node)
        if ended is not None and (not isinstance(session, str) or session == ended):
            return  # a leftover status of the process that failed or refused
        went = self._ended.get(node)
        if went is not None and (mark is None or (mark[0] == went[0] and mark[1] <= went[1])):
            return  # the process that went, replayed (or a status without its number)
        del self._why[node]
        self._process.pop(node, None)
        self._ended.pop(node, None)
        if mark is not None:
            self._latest[node] = mark
        log.info("node %s is back", node)

    def text(self, node: str) -> str:
        reason = self._why.get(node)
        return node if reason is None else f"{node} ({reason[:200]})"

    def absent(self, results: dict[str, Any]) -> dict[str, str]:
        """Why each participant without a result gave none (for the epoch's record)."""
        return {
            node: self._why.get(node, "no answer before the epoch deadline")
            for node in self.participants
            if node not in results
        }

    def epoch_complete(self, results: dict[str, Any], epoch: int) -> bool:
        """Every participant answered, or the quorum did and every other one is gone.
        RunFailed at once when too few can still answer to make the quorum."""
        waiting = [n for n in self.participants if n not in results and n not in self._why]
        if not waiting:
            if len(results) >= self.quorum:
                return True
        elif len(results) + len(waiting) >= self.quorum:
            return False
        gone = ", ".join(self.text(n) for n in self.participants if n in self._why)
        raise RunFailed(
            f"epoch {epoch}: {len(results)} answered and at most {len(waiting)} more can, "
            f"below the quorum of {self.quorum}; gone: {gone}",
            epoch=epoch,
        )


def code_problem(
    node: str, body: dict[str, Any], expected: str | None, run: str | None = None
) -> str | None:
    """Why `node`'s announced analysis code (its status's `code`) is not `expected`, or None.

    With `run`, only statuses of that run count (a node's first one after the kick-off,
    before its result): a leftover status of an earlier run may carry other code."""
    if expected is None or _gone(body) or (run is not None and body.get("run") != run):
        return None
    announced = body.get("code")
    if announced == expected:
        return None
    shown = announced[:16] + "…" if isinstance(announced, str) else "none"
    return (
        f"node {node!r} runs different analysis code (SHA-256 {shown}, the aggregator "
        f"{expected[:16]}…); every node must run the same approved code"
    )

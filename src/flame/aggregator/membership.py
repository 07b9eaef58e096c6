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

from typing import Any

__all__ = ["Instances", "code_problem"]


def _gone(body: dict[str, Any]) -> bool:
    """A status of a process that is ending or gone (offline, farewell, done, failed): it may
    arrive after the next instance's first status (a last will, a queued leftover)."""
    return body.get("state") in ("offline", "done", "failed") or body.get("online") is False


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

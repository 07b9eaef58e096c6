"""Which retained statuses are current: a genuine signature alone does not make a status new.

Why: statuses are retained, so anyone who can publish on the broker can re-publish an old
genuine one (of an earlier run of the same analysis id, or an earlier status of this run).
Acted on, such a replay faked a second process of a node (the run aborted as a split brain),
a finished or failed node, or a rejoin. So every status carries, signed with it, the process
that sent it (`instance`), when that process started (`since`), a number that grows with every
status the process signs (`seq`) and when it was signed (`at`); see `Transport.sign_status`.
Processes of a node are ordered by their generation (`gen`: one more than the generation of
the node's status the broker held when the process started; absent means 0), then by `since`:
so a restart is a restart whatever its clock says (a stepped-back clock, a VM resumed from a
snapshot), and only between processes of the same generation does a wall clock decide.

A receiver accepts, per node:
* the current process's statuses in order (`seq` never goes back; the same `seq` again is the
  status republished unchanged). Its last will is the exception: signed at connect, it is
  older than what followed, and it only says "offline". Once a process's will (or goodbye)
  was seen, only a status with a higher `seq` than any before it brings that process back: a
  process re-signs its status with the next `seq` on every reconnect, so a replay of its last
  status (same `seq`) cannot revive a node that died;
* a newer process (higher `gen`, or the same `gen` and a later `since`): a restart, which
  becomes the current one;
* an earlier process only with a status signed after this receiver started (give or take
  `CLOCK_SKEW`) that is newer than one seen from it before, or that reports a conflict: that
  process is alive now, which is what a real split brain looks like.
Everything else, and a `conflict` report signed before this receiver started, is stale: a
replay or a leftover, dropped with a WARNING (a departed earlier process's goodbye: INFO).
What this cannot catch: a replay, within `CLOCK_SKEW` of a receiver's start, of statuses
signed just before it; (the one exception above) the current process's last will, which
a replay can show again after the process came back (until its next status); and, for a
receiver that started after the will (it never saw the will), a replay of the dead process's
last status: its own view begins there.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CLOCK_SKEW", "StatusOrder", "process_fields", "process_generation"]

CLOCK_SKEW = 5.0  # seconds two sites' clocks may disagree when "signed after we started"
_INSTANCES_PER_NODE = 16
_MAX_NODES = 100_000  # unsigned runs: node names are not limited by a roster
_GONE = ("offline", "done", "failed")
_NUMBERS = (int, float)


def process_fields(status: dict[str, Any]) -> tuple[str, int, float, float] | None:
    """(instance, seq, since, at) of a status, or None if it does not carry them."""
    instance, seq = status.get("instance"), status.get("seq")
    since, at = status.get("since"), status.get("at")
    if type(instance) is not str or type(seq) is not int:
        return None
    if type(since) not in _NUMBERS or type(at) not in _NUMBERS:
        return None
    return instance, seq, float(since), float(at)  # type: ignore[arg-type]


def process_generation(status: dict[str, Any]) -> int | None:
    """A status's generation: 0 when absent (a process of an earlier flame), None when it is
    not a non-negative integer (the status is then not bound to a process)."""
    gen = status.get("gen", 0)
    return gen if type(gen) is int and gen >= 0 else None


def gone(status: dict[str, Any]) -> bool:
    return status.get("state") in _GONE or status.get("online") is False


@dataclass
class _Node:
    current: str | None = None
    current_key: tuple[int, float] = (-1, float("-inf"))  # (gen, since) of the current one
    seqs: OrderedDict[str, int] = field(default_factory=OrderedDict)  # instance -> highest
    ended: str | None = None  # the current process, once its will or goodbye was seen


class StatusOrder:
    """Per node: the current process and the highest `seq` seen of each; see the module."""

    def __init__(self, started: float | None = None) -> None:
        self.started = time.time() if started is None else started
        self._nodes: dict[str, _Node] = {}

    def check(self, node: str, status: dict[str, Any], *, signed: bool = True) -> str | None:
        """None to act on `status` (and remember it), else why it is stale.

        In a signed run `status` must be verified first: whatever passes moves the order
        forward. `signed=False` (an unsigned run, where anyone may write anything anyway): a
        status without the process fields is let through unordered."""
        fields = process_fields(status)
        gen = process_generation(status)
        if fields is None or gen is None:
            return "it is not bound to a process (no instance, seq, since, at)" if signed else None
        instance, seq, since, at = fields
        key = (gen, since)
        state = self._nodes.get(node)
        if state is None:
            if len(self._nodes) >= _MAX_NODES:
                return "too many nodes"
            state = self._nodes[node] = _Node()
        fresh = at >= self.started - CLOCK_SKEW
        if "conflict" in status and not fresh:
            return f"a conflict report signed at {_clock(at)}, before this process started"
        last = state.seqs.get(instance)
        if instance == state.current:
            assert last is not None
            if seq < last and status.get("state") != "offline":
                return f"sequence number {seq} of process {instance[:12]} is behind {last}"
            if state.ended == instance and seq <= last and not gone(status):
                return (
                    f"process {instance[:12]} went offline after its sequence number {last}; "
                    f"a status of it numbered {seq} is a replay"
                )
        elif state.current is not None and key <= state.current_key:
            # An earlier process of this node than the current one.
            if gone(status) and "conflict" not in status:
                return f"a goodbye of an earlier process ({instance[:12]}) of this node"
            if not fresh:
                return (
                    f"it is of an earlier process ({instance[:12]}, started {_clock(since)}) "
                    f"and was signed at {_clock(at)}, before this process started"
                )
            if "conflict" not in status and (last is None or seq <= last):
                return (
                    f"an earlier process ({instance[:12]}) shows nothing new "
                    f"(sequence number {seq}, seen {last if last is not None else 'none'})"
                )
        if last is None or seq > last:
            state.seqs[instance] = seq
            if state.ended == instance and not gone(status):
                state.ended = None  # back after a reconnect: a newly signed status
        if instance == state.current:
            if gone(status):
                state.ended = instance
            return None  # the common case: the current process, in order
        state.seqs.move_to_end(instance)
        while len(state.seqs) > _INSTANCES_PER_NODE:
            oldest = next(iter(state.seqs))
            if oldest == state.current:
                state.seqs.move_to_end(oldest)
                continue
            del state.seqs[oldest]
        if state.current is None or key > state.current_key or instance == state.current:
            state.current, state.current_key = instance, max(key, state.current_key)
            state.ended = instance if gone(status) else None
        return None


def _clock(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))

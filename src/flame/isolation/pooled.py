"""`analyze` in a child forked per call from the fork server, at most `slots()` at a time.

The same sandbox as `ChildRunner` (same allow-list, same requests served by this runtime,
node files only as descriptors, no network), but a child lives for one call only: it is
forked from the warmed server, imports the analysis afresh, runs one epoch in a new scratch
folder and is stopped, its scratch removed. So no node (and no epoch) sees what another left
in module globals, scratch files or memory; what a node keeps between epochs goes through
`flame.context().save/load`, held by its runtime. Used by `flame simulate` and
`flame.simulate(isolate=True)`; a production node (`flame run`) keeps one spawned child.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flame.data import Data
from flame.isolation.forkserver import server_for, slot
from flame.isolation.inprocess import Outcome
from flame.isolation.runner import ChildRunner
from flame.isolation.spawn import ChildProcess
from flame.node.context import Context

__all__ = ["PooledRunner"]

_BLOCKING = ("send", "receive")
"""Requests that wait on other nodes: the slot is lent out meanwhile (else nodes waiting
for each other's messages could hold every slot and never be answered)."""


class PooledRunner(ChildRunner):
    """A `ChildRunner` whose child is forked per `run` and stopped after it."""

    def __init__(
        self,
        analyze: Callable[..., Any],
        data: Data,
        context: Context,
        *,
        timeout: float = 3600.0,
        cut_network: bool = True,
        hide: Sequence[str | Path] = (),
        allow_messages: bool = True,
    ) -> None:
        super().__init__(
            analyze,
            data,
            context,
            timeout=timeout,
            cut_network=cut_network,
            hide=hide,
            allow_messages=allow_messages,
        )
        original = getattr(analyze, "__wrapped__", analyze)
        self._spend = getattr(original, "__flame_spend__", None)
        self._held = False
        self._epoch_ahead: tuple[int, Any] | None = None

    @property
    def declared_spend(self) -> Any:
        return self._spend  # known before any child exists (the function is imported here)

    def start(self) -> None:
        """Nothing to start: a child is forked when an epoch runs."""

    def _obtain(self) -> tuple[ChildProcess, socket.socket]:
        analysis = self.locator.get("file") or self.locator.get("path")
        server = server_for(self.cut_network, self.readable, self.hide, analysis=analysis)
        return server.fork()

    def run(self, epoch: int, previous: Any) -> Outcome:
        self._acquire()
        try:
            self._epoch_ahead = (epoch, previous)
            super().start()  # forks, sends "load" and "analyze" (see _load), reads "ready"
            if self._declared != self._spend:
                from flame.errors import AnalysisError

                self._abandon()  # none of its calls was served: nothing left through us
                raise AnalysisError(
                    "ProtocolError", "the child's analysis declares another privacy spend"
                )
            return self._outcome(self._answer("result", self._deadline))
        finally:
            self._epoch_ahead = None
            self._release()  # the next child may start while this one is stopped
            self.close()

    def _load(self, sources: dict[str, str], ctx: Context) -> dict[str, Any]:
        """Send "load" and this epoch's "analyze" at once, then wait for "ready": one round
        trip less per node. The child answers them in order, and none of its calls is
        served before "ready" has been read and its declared spend checked (`run`)."""
        if self._epoch_ahead is None:
            return super()._load(sources, ctx)
        epoch, previous = self._epoch_ahead
        ready_by = time.monotonic() + 120.0
        self._post("load", self._load_body(sources, ctx), deadline=ready_by)
        self.meter.reset()
        self._post("analyze", {"epoch": epoch, "previous": previous}, deadline=ready_by)
        ready = self._answer("ready", ready_by)
        self._deadline = time.monotonic() + self.timeout  # the epoch's, for `_wait_for`
        return ready

    def _dispatch(self, op: str, args: dict[str, Any]) -> Any:
        if op not in _BLOCKING:
            return super()._dispatch(op, args)
        self._release()
        try:
            return super()._dispatch(op, args)
        finally:
            self._acquire()

    def _acquire(self) -> None:
        slots = slot()
        while not slots.acquire(timeout=1.0):
            self._watch()  # an abort or a finished run ends the wait
        self._held = True

    def _release(self) -> None:
        if self._held:
            self._held = False
            slot().release()

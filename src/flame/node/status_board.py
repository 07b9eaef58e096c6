"""A node's retained status, with routine updates kept off the epoch's critical path.

Every status is a signed publish that each watcher receives and verifies. At a `computing` and
a `sent` per node per epoch, plus the aggregator's `collecting`, statuses were two thirds of the
messages in a fast epoch. They are for people (`flame status`) and for liveness checks that
act on sessions and final states, not on each epoch's progress. So routine updates go out at
most every `interval` seconds, the latest winning; a state others must act on (done, failed)
goes out at once, after any routine one still waiting, so watchers see each kind of state in
order. A slow epoch (longer than the interval) still shows every status as it happens.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from flame.transport.base import Transport

__all__ = ["STATUS_INTERVAL", "StatusBoard"]

log = logging.getLogger(__name__)

STATUS_INTERVAL = 0.25  # seconds between routine statuses of one node, at most


class StatusBoard:
    """Publishes one node's statuses through its transport: `now` for states others act on,
    `soon` for routine ones (coalesced). Thread-safe; `close` before the transport closes."""

    def __init__(self, transport: Transport, interval: float = STATUS_INTERVAL) -> None:
        self.transport = transport
        self.interval = interval
        self._lock = threading.Lock()
        self._waiting: dict[str, Any] | None = None  # the latest routine status not yet out
        self._timer: threading.Timer | None = None
        self._last = float("-inf")  # monotonic time of the last publish
        self._closed = False

    def now(self, status: dict[str, Any]) -> None:
        """Publish at once (a routine status still waiting goes first). Raises TransportError."""
        with self._lock:
            self._cancel_timer()
            waiting, self._waiting = self._waiting, None
            if waiting is not None:
                self._publish(waiting)
            self._publish(status)

    def soon(self, status: dict[str, Any]) -> None:
        """Publish now if the last status is older than the interval, else within it (only the
        latest of those arriving meanwhile). Raises TransportError when published now."""
        with self._lock:
            if self._closed:
                return
            due = self._last + self.interval
            if time.monotonic() >= due:
                self._cancel_timer()
                self._waiting = None
                self._publish(status)
                return
            self._waiting = status
            if self._timer is None:
                self._timer = threading.Timer(due - time.monotonic(), self._flush)
                self._timer.daemon = True
                self._timer.name = "flame-status"
                self._timer.start()

    def close(self) -> None:
        """Drop a routine status still waiting; nothing is published after this."""
        with self._lock:
            self._closed = True
            self._waiting = None
            self._cancel_timer()

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            waiting, self._waiting = self._waiting, None
            if waiting is None or self._closed:
                return
            try:
                self._publish(waiting)
            except Exception as exc:  # routine: the next status or the final one says more
                log.warning("%s could not publish its status: %s", self.transport.node_id, exc)

    def _publish(self, status: dict[str, Any]) -> None:
        self.transport.announce(status)
        self._last = time.monotonic()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

"""Node log lines forwarded to the aggregator, when the node's policy allows (`forward_logs`).

A logging handler collects this node's lines (secrets masked, each capped, a bounded number
per run); the node runtime sends them in batches from its own thread between protocol steps,
so logging never touches the network from inside a library call. The aggregator logs them
under the node's name and keeps the latest with the run in its storage, never in its status,
which every roster member may read (`flame status ID --logs`)."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable

from flame.privacy.quoting import withhold_quoted
from flame.utils.printable import escape_controls
from flame.utils.redact import redact

__all__ = ["LOG_CATEGORY", "LogForwarder"]

LOG_CATEGORY = "flame.logs"
MAX_LINE = 300
MAX_LINES = 500  # per run: a chatty analysis cannot flood the federation
_QUIET = ("flame.transport", "flame.clients", "flame.node.mailbox", "paho", "urllib3")


class LogForwarder(logging.Handler):
    """Collects log lines to forward; `take()` hands them to the sender."""

    def __init__(self, secrets: Iterable[str] = (), level: int = logging.INFO) -> None:
        super().__init__(level)
        self.secrets = list(secrets)
        self._lines: deque[str] = deque()
        self._lock_lines = threading.Lock()
        self.accepted = 0
        self.dropped = 0
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(_QUIET):
            return  # the transport's own lines would feed on themselves
        try:
            # what flame marked as quoting the node's data (a parser's row) is not forwarded
            text = withhold_quoted(redact(self.format(record), self.secrets))
        except Exception:  # a broken record must not break the node
            return
        with self._lock_lines:
            if self.accepted >= MAX_LINES:
                self.dropped += 1
                return
            self.accepted += 1
            for line in text.splitlines()[:40]:  # then no control sequence leaves the node
                self._lines.append(escape_controls(line)[:MAX_LINE])

    def take(self) -> list[str]:
        with self._lock_lines:
            lines = list(self._lines)
            self._lines.clear()
        return lines

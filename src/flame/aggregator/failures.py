"""When a run fails, and what is kept of it: node error reports, the abort, forwarded logs.

A part of `Aggregator` (`flame.aggregator.server`), kept apart from the epoch loop: a node's
error report becomes the run's failure (under a quorum, a missing answer); any stop other than
a finished run tells every node (`abort`) and keeps the failure record in storage; the log
lines nodes forward under their policy go to this log and, with storage, are kept with the run
for `flame status --logs`, never in the retained status (every roster member may read that).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any

from flame.aggregator.sending import SEND_TIMEOUT
from flame.errors import RunFailed, TransportError
from flame.node.log_forward import LOG_CATEGORY, MAX_LINE
from flame.privacy.tracebacks import trim_traceback_text
from flame.utils.printable import escape_controls
from flame.utils.public_reason import public_reason
from flame.utils.redact import redact
from flame.wire.envelope import Envelope, Kind

if TYPE_CHECKING:
    from flame.aggregator.membership import Gone
    from flame.aggregator.records import RunStore
    from flame.node.status_board import StatusBoard

__all__ = ["Failures"]

log = logging.getLogger(__name__)
node_log = logging.getLogger("flame.node_logs")  # lines the nodes forwarded (policy)

_KEPT_LOG_LINES = 500  # forwarded node log lines kept with the run (storage), latest
_MIN_LINES_PER_NODE = 20  # each node's share of them is at least this many lines
_LOG_WINDOW = 10.0  # seconds over which a node's lines written to this log are counted
_LOG_LINES_PER_WINDOW = 200  # a node's forwarded lines written to this log per window
_LOG_SAVE_EVERY = 5.0  # seconds between writes of the forwarded lines to storage


class Failures:
    """The aggregator's failure reports and aborts, and the node logs it keeps."""

    # the aggregator's, used here
    participants: list[str]
    secrets: list[str]
    store: RunStore | None
    run_id: str | None
    session: str
    board: StatusBoard
    _processes: dict[str, str]
    _gone: Gone

    if TYPE_CHECKING:

        def _send(
            self, node: str, kind: Kind, epoch: int, body: Any, timeout: float | None = None
        ) -> None: ...
        def _status(self, state: str, epoch: int = -1, **extra: Any) -> dict[str, Any]: ...

    def _init_failures(self) -> None:
        # Each node's latest lines, within its share: one node's flood must not push out
        # another's lines (`_owners` names the node of each line of `_logs`).
        self._logs: deque[str] = deque()
        self._owners: deque[str] = deque()
        self._lines_of: Counter[str] = Counter()
        self._log_share = max(_MIN_LINES_PER_NODE, _KEPT_LOG_LINES // len(self.participants))
        self._log_window: dict[str, tuple[float, int]] = {}  # node -> (window start, lines)
        self._logs_saved = 0.0  # monotonic time of the last write to storage
        self._logs_new = False  # lines arrived since then

    def _abort(self, reason: str, epoch: int, exc: BaseException | None = None) -> None:
        """Every node is told, then the retained status says `failed` after this process is
        gone: with the public reason only (who, epoch, exception type; every roster member
        reads statuses). The message and traceback stay in this log and the failure record."""
        public = public_reason(reason)
        body = {"reason": public, "run": self.run_id, "session": self.session}
        for node in self.participants:
            try:
                self._send(node, "abort", epoch, body, timeout=SEND_TIMEOUT)
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
        node = envelope.sender
        for line in lines[:200]:
            text = escape_controls(redact(str(line)[:MAX_LINE], self.secrets))
            if self._may_write(node):
                node_log.info("[%s] %s", node, text)
            self._keep_line(node, f"{node}: {text}")
        self._logs_new = True
        if time.monotonic() - self._logs_saved >= _LOG_SAVE_EVERY:
            self._save_logs()  # else with a later batch, or at the end of the run

    def _keep_line(self, node: str, line: str) -> None:
        """Keep a line within its node's share: its own oldest line goes, no one else's."""
        if self._lines_of[node] >= self._log_share:
            index = self._owners.index(node)
            del self._owners[index]
            del self._logs[index]
            self._lines_of[node] -= 1
        self._lines_of[node] += 1
        self._owners.append(node)
        self._logs.append(line)

    def _may_write(self, node: str) -> bool:
        """Whether this log takes another of the node's lines in the current window (at most
        `_LOG_LINES_PER_WINDOW`); the lines held back are counted once the window ends."""
        now = time.monotonic()
        start, count = self._log_window.get(node, (now, 0))
        if now - start >= _LOG_WINDOW:
            if count > _LOG_LINES_PER_WINDOW:
                log.warning(
                    "%d forwarded lines of %s not written to this log (at most %d per %g s); "
                    "the latest are kept with the run",
                    count - _LOG_LINES_PER_WINDOW,
                    node,
                    _LOG_LINES_PER_WINDOW,
                    _LOG_WINDOW,
                )
            start, count = now, 0
        self._log_window[node] = (start, count + 1)
        return count < _LOG_LINES_PER_WINDOW

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

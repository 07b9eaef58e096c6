"""A node's last word when it stops other than by `finished`: an error report and `failed`.

Why apart from the epoch loop: what a failure report may carry is the node operator's call.
The reason is secret-free; a traceback leaves only under the policy's `send_tracebacks`, and
without it the analysis's own exception message stays too (it is as free to carry records);
flame's words quoting the node's data stay unless the policy lets them out; a refusal of the
policy is marked as one. Whatever stays is still logged here. The report is said once, never
raising, with a short timeout: a dead broker must not stall or mask the failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flame.errors import AnalysisError, FlameError, PolicyRefused
from flame.node.delivery import GOODBYE_TIMEOUT
from flame.node.status_board import StatusBoard
from flame.privacy.policy import NodePolicy
from flame.privacy.quoting import withhold_quoted
from flame.privacy.tracebacks import analysis_traceback, trim_traceback_text
from flame.transport.base import Transport
from flame.utils.public_reason import public_reason, public_type
from flame.utils.redact import describe_exception
from flame.wire.envelope import Envelope

__all__ = ["FailureReports"]

log = logging.getLogger(__name__)


def _raised_by_analysis(exc: BaseException) -> bool:
    """An exception of the analyst's code (in the child or in this process), not flame's.
    Every AnalysisError is: the child chooses its type name, and even flame's own words for
    it (ProtocolError, ProcessExit) echo what the child sent or its exit status."""
    return isinstance(exc, AnalysisError) or not isinstance(exc, FlameError)


def _public_type(exc: BaseException) -> str:
    """The failure's type as it may leave under send_tracebacks = false: a built-in exception
    name or flame's own, else `Exception` (an analysis may name a class after a record)."""
    name = getattr(exc, "remote_type", None) or type(exc).__name__
    if not isinstance(name, str):
        return "Exception"
    return name if name in ("ProtocolError", "ProcessExit") else public_type(name)


class FailureReports:
    """One node's failure, stop and loss reports to the aggregator (see the module)."""

    def __init__(
        self,
        transport: Transport,
        aggregator_id: str,
        session: str,
        board: StatusBoard,
        status: Callable[..., dict[str, Any]],
        forward_logs: Callable[[], None],
    ) -> None:
        self.transport = transport
        self.aggregator_id = aggregator_id
        self.session = session
        self.board = board
        self._status = status  # the node's status, as of now
        self._forward_logs = forward_logs  # the log lines still waiting go first
        self.said = False

    def failure(
        self,
        epoch: int,
        exc: BaseException,
        *,
        secrets: list[str],
        policy: NodePolicy,
        log_traceback: bool,
        quoted_data_leaves: bool,
        traceback_text: str | None = None,
    ) -> str:
        """Tell the aggregator this node failed; returns the (secret-free) reason sent.

        `traceback_text` (already trimmed, e.g. from an isolated child process) is sent when
        the node's policy allows; without it, the traceback of `exc` is formatted here.
        """
        reason = describe_exception(exc, secrets)
        body: dict[str, Any] = {
            "node": self.transport.node_id,
            "epoch": epoch,
            "error": reason,
            "session": self.session,
        }
        if traceback_text is None:
            traceback_text = getattr(exc, "traceback_text", None)  # from the analysis child
        if not traceback_text:
            traceback_text = analysis_traceback(exc, secrets)
        else:
            traceback_text = trim_traceback_text(traceback_text, secrets)
        full = (reason, traceback_text)
        if log_traceback:
            log.error("epoch %d failed: %s\n%s", epoch, reason, traceback_text)
        else:
            log.debug("epoch %d failed: %s", epoch, reason)
        if not quoted_data_leaves:  # a parser's words quoting a record stay here
            reason, traceback_text = withhold_quoted(reason), withhold_quoted(traceback_text)
            body["error"] = reason
        if isinstance(exc, PolicyRefused):
            # The aggregator may count it as a missing answer (under a quorum) instead of a
            # failure; a refusal's text is flame's own, and no traceback goes with it.
            body["refused"] = True
        elif policy.send_tracebacks:
            body["traceback"] = traceback_text
        elif _raised_by_analysis(exc):  # its message is as free to carry records as a traceback
            name = _public_type(exc)
            reason = f"{name} (message withheld: this node's policy has send_tracebacks = false)"
            body["error"] = reason
        if reason != full[0] and not log_traceback:  # what stays here, said here (simulate)
            log.error("epoch %d failed: %s\n%s", epoch, full[0], full[1])
        public = None
        if _raised_by_analysis(exc) and not isinstance(exc, PolicyRefused):
            public = f"{_public_type(exc)} (details: the logs)"  # its text stays home
        self.goodbye(epoch, reason, body, public=public)
        return reason

    def stop(self, epoch: int, signal_name: str) -> str:
        """Tell the aggregator this node was stopped (SIGINT/SIGTERM) before it exits."""
        reason = f"stopped: {signal_name}"
        body = {"node": self.transport.node_id, "epoch": epoch, "error": reason}
        body["session"] = self.session
        self.goodbye(epoch, reason, {**body, "stopped": signal_name})
        return reason

    def lost(self, epoch: int, exc: BaseException, secrets: list[str]) -> None:
        """Lost the broker, heard nothing, could not send: say so while we still can."""
        self.goodbye(
            epoch,
            describe_exception(exc, secrets),
            {
                "node": self.transport.node_id,
                "epoch": epoch,
                "error": describe_exception(exc, secrets),
                "session": self.session,
            },
        )

    def goodbye(
        self, epoch: int, reason: str, body: dict[str, Any] | None, public: str | None = None
    ) -> None:
        """The error report (if any) and the `failed` status, with `public` as its reason
        (default: `reason` without an exception message); once, and never raising."""
        if self.said:
            return
        self.said = True
        self._forward_logs()
        try:
            if body is not None:
                self.transport.send(
                    Envelope(
                        self.transport.analysis_id,
                        self.transport.node_id,
                        self.aggregator_id,
                        "error",
                        epoch,
                        body,
                    ),
                    GOODBYE_TIMEOUT,
                )
            # every roster member reads statuses: no exception message (red team B2)
            shown = public if public is not None else public_reason(reason)
            self.board.now(self._status("failed", epoch, reason=shown))
        except Exception as send_exc:  # the failure report must not mask the failure
            log.error("could not report the failure to the aggregator: %s", send_exc)

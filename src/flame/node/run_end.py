"""Whether a `finished` ends this node's run (red team B7).

A new run of an analysis id with other code may find the aggregator's retained `done` status
of the earlier run, and the operator may replay that run's signed `finished`: genuine, but
the result of other code. A node takes a `finished` only if the code hash it names (and that
of the aggregator's status it joined on) is this node's, and its run is that status's run.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["ends_this_run"]

log = logging.getLogger(__name__)


def ends_this_run(status: dict[str, Any] | None, body: dict[str, Any], code: str | None) -> bool:
    """True if a `finished` with `body` may end this node's run. `status`: the aggregator's
    verified `done` status it arrives under, when the node joined after the run ended (then
    its code hash and run id must match too); `code`: this node's analysis code hash."""
    named = [body.get("code")] + ([status.get("code")] if status is not None else [])
    if code and any(value is not None and value != code for value in named):
        log.warning(
            "ignored a `finished` of a run of other analysis code (SHA-256 %s, this node "
            "runs %s): not this node's result",
            str(next(v for v in named if v is not None and v != code))[:16],
            code[:16],
        )
        return False
    if status is None:
        return True
    if code and status.get("code") != code:
        log.warning("ignored a `finished` under an aggregator status naming no code hash")
        return False
    if not isinstance(body.get("run"), str) or body.get("run") != status.get("run"):
        log.warning("ignored a `finished` of another run than the aggregator's status names")
        return False
    return True

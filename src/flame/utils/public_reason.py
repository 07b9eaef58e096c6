"""The reason a run failed, as every roster member may read it (retained statuses, aborts).

A failing analysis's exception message can hold a data row ("odd row: patient 4711 ..."),
and every roster member may read every retained status (red team B2). So what leaves the
aggregator's or a node's own log says who failed, in which epoch and with which exception
type; the message and traceback stay in the aggregator's log (and its storage, unless the
claim check shares that with the nodes). flame's own reasons (a stop signal, a timeout, a
refusal) are written by flame, never by the analysis, and are kept.
"""

from __future__ import annotations

import builtins
import re

from flame import errors

__all__ = ["public_reason", "public_type"]

# "<who> failed in epoch N: TypeName: message", "aggregator failed: TypeName: message",
# "analyze failed in epoch N: ..." (the analysis's exception: `describe_exception`'s form).
_ANALYSIS_FAILURE = re.compile(
    r"^(?P<head>(?:node '[^'\n]{1,128}' |aggregator |aggregate |analyze |converged )?"
    r"(?:failed in epoch -?\d+|failed)): (?P<inner>.*)$",
    re.DOTALL,
)
_TYPE = re.compile(r"^[A-Za-z_][\w.]{0,80}")
_BARE = re.compile(r"^(?P<type>[A-Z][\w.]{0,80}): ")  # describe_exception's "Type: message"
_DETAILS = " (details: the logs)"


def public_type(name: str) -> str:
    """`name` if it is a built-in exception's or flame's own (flame.errors), else
    `Exception`: an analysis may name its exception class after a record."""
    for module in (builtins, errors):
        known = getattr(module, name, None)
        if isinstance(known, type) and issubclass(known, BaseException):
            return name
    return "Exception"


def public_reason(reason: str) -> str:
    """`reason` without the analysis's exception message (its type is kept when it is a
    built-in's or flame's own; `Exception` otherwise)."""
    match = _ANALYSIS_FAILURE.match(reason.strip())
    if match is None:
        bare = _BARE.match(reason)
        return f"{public_type(bare['type'])}{_DETAILS}" if bare else reason[:500]
    head, inner = match["head"], match["inner"]
    nested = _ANALYSIS_FAILURE.match(inner)  # "aggregator failed: aggregate failed ..."
    if nested is not None:
        return f"{head}: {public_reason(inner).removesuffix(_DETAILS)}{_DETAILS}"
    name = _TYPE.match(inner)
    return f"{head}: {public_type(name[0]) if name else 'error'}{_DETAILS}"

"""The reason a run failed, as every roster member may read it (retained statuses, aborts).

A failing analysis's exception message can hold a data row ("odd row: patient 4711 ..."),
and every roster member may read every retained status (red team B2). So what leaves the
aggregator's or a node's own log says who failed, in which epoch and with which exception
type; the message and traceback stay in the aggregator's log (and its storage, unless the
claim check shares that with the nodes). flame's own reasons (a stop signal, a timeout, a
refusal) are written by flame, never by the analysis, and are kept.
"""

from __future__ import annotations

import re

__all__ = ["public_reason"]

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


def public_reason(reason: str) -> str:
    """`reason` without the analysis's exception message (its type is kept)."""
    match = _ANALYSIS_FAILURE.match(reason.strip())
    if match is None:
        bare = _BARE.match(reason)
        return f"{bare['type']}{_DETAILS}" if bare else reason[:500]
    head, inner = match["head"], match["inner"]
    nested = _ANALYSIS_FAILURE.match(inner)  # "aggregator failed: aggregate failed ..."
    if nested is not None:
        return f"{head}: {public_reason(inner).removesuffix(_DETAILS)}{_DETAILS}"
    name = _TYPE.match(inner)
    return f"{head}: {name[0] if name else 'error'}{_DETAILS}"

"""Short hints for error messages: close matches ("did you mean ...?") and capped name lists.

Only names (columns, settings, parameters) go into a hint, never values: the messages leave
the node in failure reports.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["did_you_mean", "name_list"]


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest known name, or "" when none is close."""
    close = difflib.get_close_matches(name, [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def name_list(names: Iterable[str], limit: int = 20) -> str:
    """`'a', 'b', 'c'` (at most `limit` names, then `and N more`), or `none`."""
    items = [repr(str(n)[:64]) for n in names]
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")

"""Text built from the node's data inside flame's own error messages, marked so it stays home.

Why: a parser's words quote the record it failed on (`Expected 1 columns, got 3: 62;26,...`:
a patient row). flame wraps such fragments in angle quotes (OPEN, CLOSE) where it builds the
message; before an error report leaves the node (its reason and its traceback),
`withhold_quoted` replaces every marked fragment, unless the node's policy says
`send_tracebacks = true` explicitly. The node's own log, and the analyst in `flame simulate`,
see the whole text.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["OPEN", "CLOSE", "WITHHELD", "quote_data", "quoted_may_leave", "withhold_quoted"]

OPEN, CLOSE = "\u2039", "\u203a"
WITHHELD = f"{OPEN}withheld: quotes the node's data{CLOSE}"
_SPAN = re.compile(f"{OPEN}[^{CLOSE}]*(?:{CLOSE}|$)")
_ROW = re.compile(r"^(CSV parse error: Expected \d+ columns, got \d+)(: )(.*)$", re.S)


def quote_data(text: str) -> str:
    """`text` (all of it built from data) marked as such."""
    return OPEN + text.replace(OPEN, "").replace(CLOSE, "") + CLOSE


def quote_parser_message(message: str) -> str:
    """A reader's (pyarrow's, DuckDB's, PostgreSQL's) message with the data it quotes
    marked: the row after a CSV column-count error, everything from its first to its last
    quote (' or "), else the whole message."""
    row = _ROW.match(message)
    if row:
        return row.group(1) + row.group(2) + quote_data(row.group(3))
    # From the first quote to the last, of either kind, as one fragment: a value may hold
    # quotes itself ('O'Brien'), so pairing them up would let part of it out (fail closed).
    starts = [i for i in (message.find("'"), message.find('"')) if i >= 0]
    last = max(message.rfind("'"), message.rfind('"'))
    if not starts or last <= min(starts):
        return quote_data(message)  # no quoted value, or one lone quote: all of it
    first = min(starts)
    return message[:first] + quote_data(message[first : last + 1]) + message[last + 1 :]


def withhold_quoted(text: str) -> str:
    """`text` with every marked fragment (also one cut off at its end) replaced."""
    return _SPAN.sub(WITHHELD, text) if OPEN in text else text


def quoted_may_leave(policy: Any) -> bool:
    """Whether marked data may leave in error reports: only when the node's policy sets
    `send_tracebacks = true` itself (the default lets tracebacks out, not records)."""
    fields: set[str] = getattr(policy, "model_fields_set", set())
    return bool(getattr(policy, "send_tracebacks", False)) and "send_tracebacks" in fields

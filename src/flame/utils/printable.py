"""Text from another machine, made safe for a terminal (red team B8).

A forwarded log line is written by the analysis code on a node; shown as it came, its ANSI
escape sequences could move the operator's cursor and rewrite what `flame status --logs`
printed (a line made to look like another node's). Control characters other than a tab are
shown as `\\xNN` instead: on the node before a line is sent, and again before it is shown.
"""

from __future__ import annotations

import re

__all__ = ["escape_controls"]

# C0 controls except tab, DEL, C1 controls; line/paragraph separators (splitlines splits on them)
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character but the tab written as an escape."""
    return _CONTROL.sub(_escaped, text)

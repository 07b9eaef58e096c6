"""`?` placeholders for PostgreSQL sources, so one style works for `data.sql` and SQL sources.

DuckDB (`data.sql`) takes `?`; psycopg takes `%s` / `%(name)s`. A query with `?` markers is
rewritten for psycopg only when that is unambiguous: the params are a sequence, the query has
no `%s`-style placeholder, and the `?` marks outside string literals, quoted identifiers,
dollar quotes and comments are exactly as many as the params. Then every `%` is doubled (psycopg
reads `%` everywhere, literals included) and those `?` become `%s`. PostgreSQL's jsonb `?`
operators are therefore untouched in a `%s`-style query.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["STYLE_HINT", "psycopg_query"]

STYLE_HINT = (
    "SQL sources take `?` placeholders (as data.sql does) or psycopg's `%s` / `%(name)s`; "
    "pass one param per placeholder"
)

_PSYCOPG_MARK = re.compile(r"%(?:\([^)]*\))?[sbt]")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def question_marks(sql: str) -> list[int]:
    """Offsets of the `?` outside literals, quoted identifiers, dollar quotes and comments."""
    marks: list[int] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c == "'" or c == '"':  # '...' ('' inside) and E'...' (\' inside); "..." ("" inside)
            escapes = c == "'" and i > 0 and sql[i - 1] in "eE"
            i += 1
            while i < n:
                if escapes and sql[i] == "\\":
                    i += 2
                    continue
                if sql[i] == c:
                    if i + 1 < n and sql[i + 1] == c:
                        i += 2
                        continue
                    break
                i += 1
            i += 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif sql.startswith("/*", i):  # nested, as PostgreSQL nests them
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "$" and (tag := _DOLLAR_TAG.match(sql, i)) and not _in_word(sql, i):
            end = sql.find(tag.group(0), tag.end())
            i = n if end < 0 else end + len(tag.group(0))
        else:
            if c == "?":
                marks.append(i)
            i += 1
    return marks


def _in_word(sql: str, i: int) -> bool:
    """`$` inside an identifier (`a$b$`) is no dollar quote."""
    return i > 0 and (sql[i - 1].isalnum() or sql[i - 1] == "_")


def psycopg_query(sql: str, params: Any) -> str:
    """`sql` with `?` markers as `%s` when they are the query's placeholders (see above)."""
    if params is None or isinstance(params, (Mapping, str, bytes)) or "?" not in sql:
        return sql
    if _PSYCOPG_MARK.search(sql.replace("%%", "")):
        return sql
    marks = question_marks(sql)
    if not marks or len(marks) != len(params):
        return sql
    parts, start = [], 0
    for mark in marks:
        parts.append(sql[start:mark].replace("%", "%%"))
        parts.append("%s")
        start = mark + 1
    parts.append(sql[start:].replace("%", "%%"))
    return "".join(parts)

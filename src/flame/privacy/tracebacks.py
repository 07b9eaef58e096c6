"""The analyst's traceback, fit to leave a node: analysis frames only, secrets masked, capped.

`analyze` runs inside flame (and, with process isolation, inside a child process); the frames
of flame's own machinery say nothing about the analyst's bug, so they are dropped. What is left
can still hold data (a value in an exception message, a source line), which is why a node's
policy may keep tracebacks at home.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from pathlib import Path

from flame.utils.redact import redact

__all__ = ["MAX_TRACEBACK_CHARS", "analysis_traceback", "trim_traceback_text"]

MAX_TRACEBACK_CHARS = 8000
_FLAME_DIR = str(Path(__file__).resolve().parents[1])  # the flame package


def _is_flame_frame(filename: str) -> bool:
    try:
        resolved = str(Path(filename).resolve())
    except (OSError, RuntimeError, ValueError):
        return False
    return resolved == _FLAME_DIR or resolved.startswith(_FLAME_DIR + "/")


def _trim(exc: traceback.TracebackException) -> None:
    seen: set[int] = set()
    current: traceback.TracebackException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = [frame for frame in current.stack if not _is_flame_frame(frame.filename)]
        current.stack = traceback.StackSummary.from_list(frames)
        current = current.__cause__ or current.__context__


def trim_traceback_text(
    text: str, secrets: Iterable[str] = (), limit: int = MAX_TRACEBACK_CHARS
) -> str:
    """Secrets masked and at most `limit` characters: the head and the (more useful) tail."""
    text = redact(text, secrets)
    if len(text) <= limit:
        return text
    head = limit // 4
    tail = limit - head - 60
    cut = len(text) - head - tail
    return f"{text[:head]}\n... ({cut} characters cut) ...\n{text[-tail:]}"


def analysis_traceback(
    exc: BaseException, secrets: Iterable[str] = (), limit: int = MAX_TRACEBACK_CHARS
) -> str:
    """The formatted traceback of `exc` without flame's frames, secrets masked, capped."""
    try:
        summary = traceback.TracebackException.from_exception(exc)
        _trim(summary)
        text = "".join(summary.format())
    except Exception as failure:  # formatting must never mask the original failure
        text = f"(traceback unavailable: {type(failure).__name__})\n"
    return trim_traceback_text(text.rstrip("\n"), secrets, limit)

"""Log set-up for the CLI: readable on a terminal, JSON lines for collectors; secrets masked.

Every line names the analysis, the node and the epoch, because a container log collector
mixes the lines of many nodes and many runs: without those three a line cannot be placed.
The federated layer says which epoch it is in through `set_epoch`; the value lives in a
contextvar (so simulated nodes in threads keep their own) with a process-wide fallback (so
lines from helper threads, e.g. the MQTT network loop, still carry the node's epoch).

Redaction is defence in depth: flame never logs a secret on purpose, but an exception text
from a library or an analyst's f-string might. Known secret values (from the config) are
masked, and so is anything shaped like a credential (JWTs, bearer tokens, URL passwords).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

from flame.utils.redact import MASK, redact

__all__ = ["configure", "current_epoch", "mask_credentials", "set_epoch", "set_node"]

_epoch: contextvars.ContextVar[int | None] = contextvars.ContextVar("flame_log_epoch", default=None)
_node: contextvars.ContextVar[str | None] = contextvars.ContextVar("flame_log_node", default=None)
_process_epoch: int | None = None

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # a JWT: header.claims.signature, the header always base64url of '{"'
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), MASK),
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{4,}"), rf"\1\2{MASK}"),
    # scheme://user:password@host
    (re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:)[^@\s/]+@"), rf"\1{MASK}@"),
    # password=..., secret_key=..., token=...; "password": "..."
    (
        re.compile(
            r"(?i)((?:password|passwd|secret|secret_key|access_token|api_key|token)=)"
            r"[^\s&\"',;]+"
        ),
        rf"\1{MASK}",
    ),
    (
        re.compile(
            r"(?i)(\"(?:password|passwd|secret|secret_key|access_token|token)\"\s*:\s*\")"
            r"[^\"]+\""
        ),
        rf"\1{MASK}\"",
    ),
)


def mask_credentials(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with known secrets and credential-shaped substrings masked."""
    text = redact(text, secrets)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def set_epoch(epoch: int | None) -> None:
    """Tell the log lines which epoch this node is in (None or < 0: not in an epoch)."""
    global _process_epoch
    value = epoch if epoch is not None and epoch >= 0 else None
    _epoch.set(value)
    _process_epoch = value


def set_node(node_id: str | None) -> None:
    """Name the node of this thread's lines (simulation runs several nodes in one process)."""
    _node.set(node_id or None)


def current_epoch() -> int | None:
    value = _epoch.get()
    return value if value is not None else _process_epoch


class _ContextFilter(logging.Filter):
    """Masks secrets and stamps analysis, node and epoch onto every record it passes."""

    def __init__(self, secrets: Iterable[str], analysis_id: str, node_id: str) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]
        self.analysis_id = analysis_id
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not lose the line
            message = f"{record.msg!r} (unformattable arguments)"
        record.msg, record.args = mask_credentials(message, self.secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_credentials(record.exc_text, self.secrets)
        record.exc_info = None  # keep formatters from re-rendering the unmasked traceback
        if record.stack_info:
            record.stack_info = mask_credentials(record.stack_info, self.secrets)
        record.analysis_id = getattr(record, "analysis_id", None) or self.analysis_id
        record.node_id = getattr(record, "node_id", None) or _node.get() or self.node_id
        if getattr(record, "epoch", None) is None:
            record.epoch = current_epoch()
        return True


def _utc(created: float, msecs: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(msecs):03d}Z"


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: what log collectors index without a parsing rule."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _utc(record.created, record.msecs),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "analysis_id": getattr(record, "analysis_id", ""),
            "node_id": getattr(record, "node_id", ""),
            "epoch": getattr(record, "epoch", None),
        }
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False, default=str)


class _TextFormatter(logging.Formatter):
    """Short lines for a person: the time of day on a terminal, the full UTC time in files."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def format(self, record: logging.LogRecord) -> str:
        if self.tty:
            stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        else:
            stamp = _utc(record.created, record.msecs)
        where = "/".join(
            part
            for part in (getattr(record, "analysis_id", ""), getattr(record, "node_id", ""))
            if part
        )
        epoch = getattr(record, "epoch", None)
        if epoch is not None:
            where = f"{where} e{epoch}" if where else f"e{epoch}"
        prefix = f"[{where}] " if where else ""
        text = f"{stamp} {record.levelname:<7} {prefix}{record.getMessage()}"
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + record.stack_info
        return text


_installed: logging.Handler | None = None


def configure(
    *,
    level: str = "INFO",
    fmt: str = "text",
    secrets: Iterable[str] = (),
    analysis_id: str = "",
    node_id: str = "",
    stream: TextIO | None = None,
) -> logging.Handler:
    """Route log lines to stderr (or `stream`); a second call replaces the first's handler.

    The handler sits on the root logger so warnings from libraries (paho, urllib3, httpx)
    come out in the same format and through the same redaction; their level stays at the
    root's (WARNING by default) while flame's own loggers get `level`.
    """
    global _installed
    target = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(target)
    handler.addFilter(_ContextFilter(secrets, analysis_id, node_id))
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        isatty = getattr(target, "isatty", None)
        handler.setFormatter(_TextFormatter(bool(isatty()) if callable(isatty) else False))
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    flame_logger = logging.getLogger("flame")
    root.addHandler(handler)
    _installed = handler
    flame_logger.setLevel(level)
    flame_logger.propagate = True
    return handler

"""Log set-up for the CLI: readable on a terminal, JSON lines for collectors; secrets masked."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable

from flame._redact import redact


class _RedactingFilter(logging.Filter):
    def __init__(self, secrets: Iterable[str], fields: dict[str, str]) -> None:
        super().__init__()
        self.secrets = list(secrets)
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        message = redact(record.getMessage(), self.secrets)
        record.msg, record.args = message, None
        for key, value in self.fields.items():
            setattr(record, key, value)
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "analysis_id": getattr(record, "analysis_id", ""),
            "node_id": getattr(record, "node_id", ""),
        }
        return json.dumps(line)


def configure(
    *,
    level: str = "INFO",
    fmt: str = "text",
    secrets: Iterable[str] = (),
    analysis_id: str = "",
    node_id: str = "",
) -> None:
    """Route flame's logs to stderr; idempotent (a second call replaces the handler)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RedactingFilter(secrets, {"analysis_id": analysis_id, "node_id": node_id}))
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        prefix = f"[{node_id}] " if node_id else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s"))
    root = logging.getLogger("flame")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False

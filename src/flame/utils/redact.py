"""Keep secrets out of text that leaves the process (logs, error reports, messages)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

MASK = "***"


def redact(text: str, secrets: Iterable[str], mask: str = MASK) -> str:
    """`text` with every secret (of 4+ characters, longest first so overlaps cannot leak a
    tail) masked, in any letter case: a URL host that carries one comes back lowercased."""
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = re.sub(re.escape(secret), lambda _: mask, text, flags=re.IGNORECASE)
    return text


def file_secret(path: Path) -> str:
    """The secret held in a file (a mounted token), "" when it cannot be read."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return path.read_text(encoding="utf-8").strip()
    return ""


def url_password(url: str | None) -> str | None:
    """The password in a URL's user info (`scheme://user:password@host`), if any."""
    if not url or "@" not in url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def describe_exception(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """'TypeName: message', one line, secrets masked, capped at 500 characters."""
    message = " ".join(str(exc).split())
    name = getattr(exc, "remote_type", None) or type(exc).__name__  # analysis child's error
    text = f"{name}: {message}" if message else name
    text = redact(text, secrets)
    return text if len(text) <= 500 else text[:497] + "..."

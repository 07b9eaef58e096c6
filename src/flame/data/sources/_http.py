"""Shared HTTP machinery of the HTTP file and FHIR sources: timeouts, retries, safe errors.

Every call has a timeout; connection errors, 429 and 5xx are retried with exponential
backoff (honouring `Retry-After`, capped), other 4xx are not, because asking again with the
same token or query cannot succeed. Errors name the source, the URL path (never the query
string, which may hold search terms or page tokens) and the status; the bearer token is never
logged or put in a message.
"""

from __future__ import annotations

import email.utils
import logging
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import PurePosixPath
from types import TracebackType
from typing import IO, Any, TypeVar

import httpx

from flame.clients.token import TokenSource, redact
from flame.config import DataSourceSettings
from flame.errors import DataError

__all__ = ["CHUNK_SIZE", "DEFAULT_SPOOL_THRESHOLD", "HttpStatusError", "Params"]

log = logging.getLogger(__name__)

DEFAULT_SPOOL_THRESHOLD = 8 * 1024 * 1024
"""Files larger than this are spooled to a temp file instead of memory."""
CHUNK_SIZE = 256 * 1024
_RETRY_STATUSES = {429, 500, 502, 503, 504}

_S = TypeVar("_S", bound="_HttpService")

Scalar = str | int | float
Params = Mapping[str, Scalar | Sequence[Scalar]]


class HttpStatusError(DataError):
    """The service answered with an error status that retrying cannot fix (4xx)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, float((moment - datetime.now(timezone.utc)).total_seconds()))


def _spool(threshold: int) -> IO[bytes]:
    return tempfile.SpooledTemporaryFile(max_size=threshold)


def _check_name(source: str, name: str) -> str:
    path = PurePosixPath(name)
    if (
        not name
        or path.is_absolute()
        or any(part in ("", ".", "..") for part in name.split("/"))
        or "\\" in name
    ):
        raise DataError(f"data source {source!r}: file name {name!r} must be relative")
    return name


_Service = TypeVar("_Service", bound="_HttpService")


class _HttpService:
    """Shared request machinery: bearer token per request, timeouts, retries, safe errors."""

    kind: str = "http"

    @classmethod
    def from_settings(
        cls: type[_Service],
        settings: DataSourceSettings,
        tokens: TokenSource | None = None,
        **options: Any,
    ) -> _Service:
        """The source `settings` describe (timeouts and retries from the settings)."""
        if not settings.url:
            raise DataError(f"data source {settings.name!r}: kind={cls.kind} needs a url")
        options.setdefault("timeout", settings.timeout)
        options.setdefault("retries", settings.retries)
        return cls(settings.name, settings.url, tokens, **options)

    def __init__(
        self,
        name: str,
        base_url: str,
        tokens: TokenSource | None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 30.0,
        client: httpx.Client | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise DataError(f"data source {name!r}: url must start with http:// or https://")
        self.name = name
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self._base = httpx.URL(self.base_url)
        self._tokens = tokens
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._owns_client = client is None
        self._client = client or httpx.Client(
            timeout=httpx.Timeout(timeout), follow_redirects=False
        )

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _token(self) -> str | None:
        return self._tokens.get() if self._tokens is not None else None

    def _same_origin(self, url: httpx.URL) -> bool:
        base = self._base
        return (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port)

    def _where(self, method: str, url: httpx.URL) -> str:
        return f"data source {self.name!r}: {method} {url.path}"

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            hinted = _retry_after(response.headers.get("Retry-After"))
            if hinted is not None:
                return min(hinted, self.max_backoff)
        base = self.backoff * (2.0**attempt)
        return min(self.max_backoff, base * random.uniform(0.75, 1.25))

    def _detail(self, response: httpx.Response, token: str | None) -> str:
        """The first diagnostic of a FHIR OperationOutcome, if the server sent one."""
        try:
            body = response.json()
        except (ValueError, UnicodeDecodeError, httpx.ResponseNotRead):
            return ""
        if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
            return ""
        issues = body.get("issue")
        if not isinstance(issues, list) or not issues or not isinstance(issues[0], dict):
            return ""
        text = str(issues[0].get("diagnostics") or issues[0].get("code") or "")
        text = redact(text, [token] if token else [])
        return f": {text[:200]}" if text else ""

    def _request(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        params: Params | None = None,
        stream: bool = False,
        accept: str = "application/json",
    ) -> httpx.Response:
        target = httpx.URL(url)
        if not self._same_origin(target):
            raise DataError(
                f"data source {self.name!r}: refusing to follow a link to another host "
                f"({target.host}); the token is only sent to {self._base.host}"
            )
        where = self._where(method, target)
        attempts = self.retries + 1
        rotated = False
        attempt = 0
        while True:
            token = self._token()
            headers = {"Accept": accept}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            request = self._client.build_request(method, target, params=params, headers=headers)
            response: httpx.Response | None = None
            try:
                response = self._client.send(request, stream=stream)
            except httpx.TimeoutException:
                problem = f"timed out after {self.timeout:g} s"
            except httpx.TransportError as exc:
                problem = f"connection failed ({type(exc).__name__})"
            else:
                status = response.status_code
                if status < 400:
                    return response
                if status == 401 and not rotated and self._tokens is not None:
                    rotated = True
                    if self._token() != token:  # the secret rotated under us: try the new one
                        response.close()
                        log.info("%s: HTTP 401, retrying once with the rotated token", where)
                        continue
                if status not in _RETRY_STATUSES:
                    if stream:
                        response.read()
                    detail = self._detail(response, token)
                    response.close()
                    hint = {401: " (token rejected)", 403: " (access denied)"}.get(status, "")
                    raise HttpStatusError(
                        f"{where} -> HTTP {status} {response.reason_phrase}{hint}{detail}", status
                    )
                problem = f"HTTP {status} {response.reason_phrase}"
            if attempt + 1 >= attempts:
                if response is not None:
                    response.close()
                raise DataError(f"{where} -> {problem} (after {attempts} attempts)")
            delay = self._delay(attempt, response)
            if response is not None:
                response.close()
            attempt += 1
            log.warning(
                "%s -> %s; retry %d/%d in %.2f s", where, problem, attempt, self.retries, delay
            )
            time.sleep(delay)

    def _json(self, method: str, url: str | httpx.URL, params: Params | None = None) -> Any:
        response = self._request(method, url, params=params, accept="application/fhir+json")
        try:
            return response.json()
        except (ValueError, UnicodeDecodeError):
            raise DataError(
                f"{self._where(method, httpx.URL(url))}: response is not valid JSON"
            ) from None

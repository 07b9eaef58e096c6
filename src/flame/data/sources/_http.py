"""Shared HTTP machinery of the HTTP file and FHIR sources: timeouts, retries, safe errors.

Every call has a timeout, per socket operation and for the whole answer: a body must arrive
within `timeout` plus its size at `MIN_RATE` (a server trickling a byte at a time cannot
hold the caller), up to a size cap, and never past the current `call_deadline` (what is
left of a node's epoch). Connection errors, 429 and 5xx are retried with exponential backoff
(honouring `Retry-After`, capped), other 4xx are not, because asking again with the same
token or query cannot succeed; any status outside 2xx is an error (redirects are not
followed). Errors name the source, the URL path (never the query string, which may hold
search terms or page tokens) and the status with its standard phrase (never the server's,
which can echo anything); the bearer token is never logged or put in a message.
"""

from __future__ import annotations

import email.utils
import http
import io
import json
import logging
import random
import re
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
from flame.data.sources._deadline_io import deadline, deadline_client
from flame.errors import DataError
from flame.utils.deadline import call_left

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_SPOOL_THRESHOLD",
    "MAX_JSON_BYTES",
    "MIN_RATE",
    "HttpStatusError",
    "Params",
]

log = logging.getLogger(__name__)

DEFAULT_SPOOL_THRESHOLD = 8 * 1024 * 1024
"""Files larger than this are spooled to a temp file instead of memory."""
CHUNK_SIZE = 256 * 1024
MAX_FILE_BYTES = 16 * 1024**3
"""The largest file a source reads (to a temp file): a broken or hostile server cannot fill
the disk."""
MIN_RATE = 16 * 1024
"""Bytes/s an answer must average after its first `timeout` seconds."""
MAX_JSON_BYTES = 64 * 1024 * 1024
"""The largest JSON answer (a FHIR page, a file index) read into memory."""
_MAX_ERROR_BYTES = 64 * 1024  # of an error answer, read for its OperationOutcome
_RETRY_STATUSES = {429, 500, 502, 503, 504}
_GRACE = 0.5  # seconds past the time left before an exchange's sockets are refused
_TOKEN_RUN = 8  # a diagnostic sharing this many characters with a token is dropped

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


def _phrase(status: int) -> str:
    """The standard reason phrase: the server's own can echo the request (and its token)."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "(non-standard status)"


def _spool(threshold: int) -> IO[bytes]:
    return tempfile.SpooledTemporaryFile(max_size=threshold)


def check_progress(where: str, got: int, started: float, timeout: float, cap: int) -> None:
    """DataError once a download passes `cap` bytes, its time (`timeout` plus its size at
    `MIN_RATE`) or the `call_deadline`; called after each chunk (HTTP and S3 sources)."""
    if got > cap:
        raise DataError(f"{where}: the answer is larger than {cap:,} bytes")
    spent = time.monotonic() - started
    if spent > timeout + got / MIN_RATE:
        raise DataError(
            f"{where}: too slow, {got:,} bytes in {spent:.1f} s (an answer must arrive "
            f"within the {timeout:g} s timeout plus 1 s per {MIN_RATE // 1024} KiB)"
        )
    if call_left() <= 0:
        raise DataError(f"{where}: the epoch's deadline passed during the download")


def _shares_run(text: str, secret: str) -> bool:
    """Whether `text` holds any `_TOKEN_RUN` consecutive characters of `secret` (any case)."""
    folded = text.casefold()
    secret = secret.casefold()
    return any(secret[i : i + _TOKEN_RUN] in folded for i in range(len(secret) - _TOKEN_RUN + 1))


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
        self._sent: set[str] = set()  # tokens sent: masked in every message (`_clean`)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._owns_client = client is None
        self._client = client or deadline_client(timeout)

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
        return self._clean(f"data source {self.name!r}: {method} {url.path}")

    def _echoable(self, value: object) -> bool:
        """Whether a server's word (a resourceType) may appear in a message: a plain name
        that shares no `_TOKEN_RUN` characters with a token sent."""
        return (
            isinstance(value, str)
            and re.fullmatch(r"[A-Za-z]{1,64}", value) is not None
            and not any(_shares_run(value, secret) for secret in self._sent)
        )

    def _clean(self, text: str) -> str:
        """`text` with every token sent so far masked (a next link's path can carry one)."""
        return redact(text, self._sent)

    def _body(
        self, response: httpx.Response, where: str, sink: IO[bytes], started: float, cap: int
    ) -> None:
        """The answer's body into `sink`, within its time (`timeout` plus its size at
        `MIN_RATE`, never past the `call_deadline`) and at most `cap` bytes."""
        got = 0
        with deadline(time.monotonic() + call_left(self.timeout + cap / MIN_RATE) + _GRACE):
            for chunk in response.iter_bytes():  # as it arrives: the clock is checked per read
                got += len(chunk)
                check_progress(where, got, started, self.timeout, cap)
                sink.write(chunk)

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            hinted = _retry_after(response.headers.get("Retry-After"))
            if hinted is not None:
                return min(hinted, self.max_backoff)
        base = self.backoff * (2.0**attempt)
        return min(self.max_backoff, base * random.uniform(0.75, 1.25))

    def _detail(self, response: httpx.Response, token: str | None, started: float) -> str:
        """The first diagnostic of a FHIR OperationOutcome, if the server sent one and it
        cannot carry a token: none for 401/403 (servers quote the token they rejected), and
        none that shares a run of `_TOKEN_RUN` characters with a token sent."""
        if response.status_code in (401, 403):
            return ""
        sink = io.BytesIO()
        try:
            self._body(response, "", sink, started, _MAX_ERROR_BYTES)
            body = json.loads(sink.getvalue())
        except (ValueError, UnicodeDecodeError, RecursionError, DataError, httpx.HTTPError):
            return ""
        if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
            return ""
        issues = body.get("issue")
        if not isinstance(issues, list) or not issues or not isinstance(issues[0], dict):
            return ""
        text = str(issues[0].get("diagnostics") or issues[0].get("code") or "")
        sent = {*self._sent, *([token] if token else [])}
        if any(_shares_run(text, secret) for secret in sent):
            return ""
        return f": {text[:200]}" if text else ""

    def _request(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        params: Params | None = None,
        accept: str = "application/json",
    ) -> httpx.Response:
        """A 2xx answer, its body not yet read; other statuses and failures: DataError."""
        target = httpx.URL(url)
        if not self._same_origin(target):
            raise DataError(
                self._clean(
                    f"data source {self.name!r}: refusing to follow a link to another host "
                    "(the token is only sent to the source's own host)"
                )
            )
        where = self._where(method, target)
        attempts = self.retries + 1
        rotated = False
        attempt = 0
        while True:
            left = call_left(self.timeout)
            if left <= 0:
                raise DataError(f"{where}: no time left before the epoch's deadline")
            token = self._token()
            headers = {"Accept": accept}
            if token:
                self._sent.add(token)
                headers["Authorization"] = f"Bearer {token}"
            request = self._client.build_request(
                method, target, params=params, headers=headers, timeout=httpx.Timeout(left)
            )
            response: httpx.Response | None = None
            started = time.monotonic()
            try:
                with deadline(started + left + _GRACE):  # headers trickled: still bounded
                    response = self._client.send(request, stream=True)
            except httpx.TimeoutException:
                problem = f"timed out after {left:g} s"
            except httpx.TransportError as exc:
                problem = f"connection failed ({type(exc).__name__})"
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return response  # streamed: the caller reads it (`_body`) and closes it
                if status == 401 and not rotated and self._tokens is not None:
                    rotated = True
                    if self._token() != token:  # the secret rotated under us: try the new one
                        response.close()
                        log.info("%s: HTTP 401, retrying once with the rotated token", where)
                        continue
                if status not in _RETRY_STATUSES:
                    detail = self._detail(response, token, started) if status >= 400 else ""
                    response.close()
                    hint = {401: " (token rejected)", 403: " (access denied)"}.get(status, "")
                    if status < 400:
                        hint = " (not a 2xx answer; redirects are not followed)"
                    raise HttpStatusError(
                        self._clean(f"{where} -> HTTP {status} {_phrase(status)}{hint}{detail}"),
                        status,
                    )
                problem = f"HTTP {status} {_phrase(status)}"
            if attempt + 1 >= attempts:
                if response is not None:
                    response.close()
                raise DataError(f"{where} -> {problem} (after {attempt + 1} attempts)")
            delay = self._delay(attempt, response)
            if response is not None:
                response.close()
            if delay >= call_left():
                raise DataError(f"{where} -> {problem} (no time left for a retry)")
            attempt += 1
            log.warning(
                "%s -> %s; retry %d/%d in %.2f s", where, problem, attempt, self.retries, delay
            )
            time.sleep(delay)

    def _json(self, method: str, url: str | httpx.URL, params: Params | None = None) -> Any:
        """The answer parsed as JSON; DataError (naming the source) for anything else."""
        response = self._request(method, url, params=params, accept="application/fhir+json")
        started = time.monotonic()
        where = self._where(method, httpx.URL(url))
        sink = io.BytesIO()
        try:
            self._body(response, where, sink, started, MAX_JSON_BYTES)
        except httpx.TimeoutException:
            raise DataError(f"{where}: timed out reading the answer") from None
        except httpx.TransportError as exc:
            raise DataError(f"{where}: answer interrupted ({type(exc).__name__})") from None
        finally:
            response.close()
        try:
            return json.loads(sink.getvalue())
        except (ValueError, UnicodeDecodeError):
            raise DataError(f"{where}: response is not valid JSON") from None
        except RecursionError:
            raise DataError(f"{where}: response is JSON nested too deeply to read") from None

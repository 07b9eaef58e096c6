"""Data sources a node reads through its data API: FHIR search, HTTP files, S3 objects.

The analysis sees them through `flame.data.Data`; this module only knows services, not
epochs. Every call has a timeout; connection errors, 429 and 5xx are retried with
exponential backoff (honouring `Retry-After`, capped), other 4xx are not, because asking
again with the same token or query cannot succeed. Errors name the source, the URL path
(never the query string, which may hold search terms or page tokens) and the status; the
bearer token is never logged or put in a message.

The small HTTP file protocol `HttpFileSource` speaks (any static server with a JSON index
can serve it):

* `GET {base}/` returns a JSON array of file names, relative and '/'-separated;
* `GET {base}/{name}` (each path segment percent-encoded) returns the file's bytes, 404
  when there is no such file.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import random
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import PurePosixPath
from types import TracebackType
from typing import IO, Any, Literal, TypeVar
from urllib.parse import quote

import httpx
import numpy as np
from minio.error import MinioException, S3Error
from urllib3.exceptions import HTTPError as Urllib3Error

from flame.clients.minio_client import make_minio_client, parse_endpoint
from flame.clients.object_store import StorageError
from flame.config import DataSourceSettings
from flame.data import LocalSource
from flame.errors import DataError
from flame.utils.token import TokenError, TokenSource, redact, source_service_name

__all__ = [
    "DEFAULT_SPOOL_THRESHOLD",
    "FhirSource",
    "HttpFileSource",
    "HttpStatusError",
    "Params",
    "S3Source",
    "open_source",
    "open_sources",
    "probe_sources",
]

log = logging.getLogger(__name__)

DEFAULT_SPOOL_THRESHOLD = 8 * 1024 * 1024
"""Files larger than this are spooled to a temp file instead of memory."""
CHUNK_SIZE = 256 * 1024
_RETRY_STATUSES = {429, 500, 502, 503, 504}
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")

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


# ------------------------------------------------------------------------------------ FHIR


def _walk(resource: Any, path: Sequence[str]) -> Any:
    """Follow a dotted path; a list is indexed by a numeric segment, else its first item."""
    value = resource
    for segment in path:
        if isinstance(value, list):
            if segment.isdigit():
                index = int(segment)
                value = value[index] if index < len(value) else None
                continue
            value = value[0] if value else None
        if isinstance(value, dict):
            value = value.get(segment)
        else:
            return None
        if value is None:
            return None
    if isinstance(value, list):
        value = value[0] if value else None
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _to_column(values: list[Any]) -> np.ndarray:
    """float64 (NaN for missing) when every present value is a JSON number, else text."""
    if all(v is None or _is_number(v) for v in values):
        return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    return np.array([_text(v) for v in values], dtype=str)


class FhirSource(_HttpService):
    """A FHIR R4 REST endpoint: searches streamed page by page, optionally as columns."""

    kind: Literal["fhir"] = "fhir"
    remote_methods = ("search", "table", "count")  # what an isolated analysis may call

    def __init__(
        self,
        name: str,
        base_url: str,
        tokens: TokenSource | None = None,
        *,
        page_size: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(name, base_url, tokens, **options)
        self.page_size = page_size

    def _type_url(self, resource_type: str) -> str:
        if not _RESOURCE_TYPE.match(resource_type):
            raise DataError(f"data source {self.name!r}: {resource_type!r} is not a resource type")
        return self.base_url + resource_type

    def _bundle(self, url: str | httpx.URL, params: Params | None) -> dict[str, Any]:
        body = self._json("GET", url, params)
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            kind = body.get("resourceType") if isinstance(body, dict) else type(body).__name__
            raise DataError(
                f"{self._where('GET', httpx.URL(url))}: expected a FHIR Bundle, got {kind!r}"
            )
        return body

    def pages(
        self, resource_type: str, params: Params | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """The matching resources one page at a time; only the current page is held."""
        query: dict[str, Any] = dict(params or {})
        if self.page_size is not None:
            query.setdefault("_count", self.page_size)
        url: str | None = self._type_url(resource_type)
        first = True
        seen: set[str] = set()
        while url is not None:
            bundle = self._bundle(url, query if first else None)
            first = False
            entries = bundle.get("entry") or []
            if not isinstance(entries, list):
                raise DataError(f"data source {self.name!r}: Bundle.entry is not a list")
            page: list[dict[str, Any]] = []
            for entry in entries:
                if not isinstance(entry, dict):
                    continue
                mode = (entry.get("search") or {}).get("mode")
                resource = entry.get("resource")
                if isinstance(resource, dict) and mode in (None, "match"):
                    page.append(resource)
            yield page
            url = None
            for link in bundle.get("link") or []:
                if isinstance(link, dict) and link.get("relation") == "next":
                    url = str(link.get("url") or "") or None
            if url is not None:
                if url in seen:
                    raise DataError(
                        f"data source {self.name!r}: the server's next link repeats; "
                        "stopping instead of paging forever"
                    )
                seen.add(url)

    def search(self, resource_type: str, params: Params | None = None) -> Iterator[dict[str, Any]]:
        """Every matching resource, in server order, following `next` links to the end."""
        for page in self.pages(resource_type, params):
            yield from page

    def table(
        self, resource_type: str, fields: Mapping[str, str], params: Params | None = None
    ) -> dict[str, np.ndarray]:
        """Chosen fields of every match as columns (`{"value": "valueQuantity.value"}`).

        Paths are dotted; inside a list, a numeric segment indexes (`code.coding.1.code`)
        and any other segment reads the first item. Columns whose present values are all JSON
        numbers become float64 with NaN where missing; others become text ("" if missing).
        Only the chosen values are kept, never the resources.
        """
        paths = {column: path.split(".") for column, path in fields.items()}
        values: dict[str, list[Any]] = {column: [] for column in fields}
        for resource in self.search(resource_type, params):
            for column, path in paths.items():
                values[column].append(_walk(resource, path))
        return {column: _to_column(column_values) for column, column_values in values.items()}

    def count(self, resource_type: str, params: Params | None = None) -> int:
        """How many resources match, without fetching them (`_summary=count`)."""
        query = {**dict(params or {}), "_summary": "count"}
        total = self._bundle(self._type_url(resource_type), query).get("total")
        if not isinstance(total, int) or isinstance(total, bool):
            raise DataError(f"data source {self.name!r}: the server did not report a total")
        return total

    def probe(self, resource_type: str = "Patient") -> None:
        """One authenticated search, so a rejected token stops the node before any work."""
        try:
            self.count(resource_type)
        except HttpStatusError as exc:
            if exc.status in (401, 403):
                raise TokenError(
                    source_service_name(self.name),
                    f"token rejected by the server (HTTP {exc.status})",
                ) from None
            raise


# ------------------------------------------------------------------------------- HTTP files


class HttpFileSource(_HttpService):
    """Files over HTTP (protocol in the module docstring); a `flame.data.FileSource`."""

    kind: Literal["http"] = "http"

    def __init__(
        self,
        name: str,
        base_url: str,
        tokens: TokenSource | None = None,
        *,
        spool_threshold: int = DEFAULT_SPOOL_THRESHOLD,
        **options: Any,
    ) -> None:
        super().__init__(name, base_url, tokens, **options)
        self.spool_threshold = spool_threshold

    def files(self) -> list[str]:
        names = self._json("GET", self.base_url)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(
                f"data source {self.name!r}: GET {self._base.path} must return a JSON list of names"
            )
        return sorted(_check_name(self.name, n) for n in names)

    def open(self, name: str) -> IO[bytes]:
        """The file, streamed into memory up to the spool threshold, to a temp file above."""
        _check_name(self.name, name)
        url = self.base_url + quote(name, safe="/")
        attempt = 0
        while True:
            response = self._request("GET", url, stream=True, accept="*/*")
            spool = _spool(self.spool_threshold)
            try:
                for chunk in response.iter_bytes(CHUNK_SIZE):
                    spool.write(chunk)
            except httpx.TransportError as exc:
                spool.close()
                problem = f"download interrupted ({type(exc).__name__})"
                if attempt >= self.retries:
                    raise DataError(
                        f"{self._where('GET', httpx.URL(url))} -> {problem} "
                        f"(after {attempt + 1} attempts)"
                    ) from None
                delay = self._delay(attempt, None)
                attempt += 1
                where = self._where("GET", httpx.URL(url))
                log.warning("%s -> %s; retry in %.2f s", where, problem, delay)
                time.sleep(delay)
                continue
            finally:
                response.close()
            spool.seek(0)
            return spool

    def probe(self) -> None:
        try:
            self.files()
        except HttpStatusError as exc:
            if exc.status in (401, 403):
                raise TokenError(
                    source_service_name(self.name),
                    f"token rejected by the server (HTTP {exc.status})",
                ) from None
            raise


# --------------------------------------------------------------------------------------- S3


class S3Source:
    """Objects under a bucket prefix, read through the minio client; a `FileSource`."""

    kind: Literal["s3"] = "s3"

    def __init__(
        self,
        name: str,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        spool_threshold: int = DEFAULT_SPOOL_THRESHOLD,
    ) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.name = name
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.spool_threshold = spool_threshold

    @classmethod
    def from_settings(
        cls, settings: DataSourceSettings, tokens: TokenSource | None = None
    ) -> S3Source:
        if not settings.url or not settings.bucket:
            raise DataError(f"data source {settings.name!r}: kind=s3 needs url and bucket")
        try:
            endpoint, secure = parse_endpoint(settings.url)
        except StorageError as exc:
            raise DataError(f"data source {settings.name!r}: {exc}") from None
        secret = settings.secret_key.get_secret_value() if settings.secret_key else None
        client = make_minio_client(
            endpoint,
            access_key=settings.access_key,
            secret_key=secret,
            secure=secure,
            timeout=settings.timeout,
            retries=settings.retries,
            token_source=tokens,
        )
        return cls(settings.name, client, settings.bucket, settings.prefix)

    def _fail(self, exc: Exception, key: str | None) -> DataError:
        where = f"data source {self.name!r}: s3://{self.bucket}/{key or self.prefix}"
        if isinstance(exc, S3Error):
            return DataError(f"{where}: {exc.code}")
        if isinstance(exc, Urllib3Error):
            reason = getattr(exc, "reason", None) or exc
            return DataError(f"{where}: cannot reach the endpoint ({type(reason).__name__})")
        if isinstance(exc, ValueError):
            return DataError(f"{where}: {exc}")
        return DataError(f"{where}: {type(exc).__name__}")

    def files(self) -> list[str]:
        try:
            return sorted(
                obj.object_name[len(self.prefix) :]
                for obj in self.client.list_objects(self.bucket, prefix=self.prefix, recursive=True)
                if obj.object_name and not obj.is_dir and not obj.object_name.endswith("/")
            )
        except (MinioException, Urllib3Error, ValueError) as exc:
            raise self._fail(exc, None) from None

    def open(self, name: str) -> IO[bytes]:
        key = self.prefix + _check_name(self.name, name)
        spool = _spool(self.spool_threshold)
        try:
            response = self.client.get_object(self.bucket, key)
            try:
                for chunk in response.stream(CHUNK_SIZE):
                    spool.write(chunk)
            finally:
                response.close()
                response.release_conn()
        except (MinioException, Urllib3Error, ValueError) as exc:
            spool.close()
            raise self._fail(exc, key) from None
        spool.seek(0)
        return spool

    def probe(self) -> None:
        try:
            found = self.client.bucket_exists(self.bucket)
        except S3Error as exc:
            if exc.code in (
                "AccessDenied",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "ExpiredToken",
                "InvalidToken",
            ):
                raise TokenError(
                    source_service_name(self.name), f"credentials rejected ({exc.code})"
                ) from None
            raise self._fail(exc, None) from None
        except (MinioException, Urllib3Error, ValueError) as exc:
            raise self._fail(exc, None) from None
        if not found:
            raise DataError(f"data source {self.name!r}: bucket {self.bucket!r} does not exist")


# ---------------------------------------------------------------------------------- factory


def open_source(settings: DataSourceSettings, token_source: TokenSource | None = None) -> object:
    """The source `settings` describe; give it to `flame.data.Data` under `settings.name`."""
    tokens = token_source
    if tokens is None and settings.kind != "local":
        tokens = TokenSource(settings, source_service_name(settings.name))
    if settings.kind == "local":
        if settings.path is None:
            raise DataError(f"data source {settings.name!r}: kind=local needs a path")
        return LocalSource(settings.path, name=settings.name)
    if settings.kind == "fhir":
        return FhirSource.from_settings(settings, tokens)
    if settings.kind == "http":
        return HttpFileSource.from_settings(settings, tokens)
    return S3Source.from_settings(settings, tokens)


def probe_sources(sources: Mapping[str, object]) -> None:
    """Touch every source once at start-up; a rejected token raises `TokenError`.

    Local sources have nothing to probe. The first failure is raised, so the node stops
    before any work with one line naming the source.
    """
    for source in sources.values():
        probe = getattr(source, "probe", None)
        if callable(probe):
            probe()


def open_sources(settings: Sequence[DataSourceSettings]) -> dict[str, object]:
    """name -> source for every configured source, in config order (first is the default)."""
    sources: dict[str, object] = {}
    for entry in settings:
        if entry.name in sources:
            raise DataError(f"two data sources are named {entry.name!r}")
        sources[entry.name] = open_source(entry)
    return sources

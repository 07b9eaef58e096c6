"""Files over HTTP: a JSON index at the base URL, each file below it.

The protocol (any static server with a JSON index can serve it):

* `GET {base}/` returns a JSON array of file names, relative and '/'-separated;
* `GET {base}/{name}` (each path segment percent-encoded) returns the file's bytes, 404
  when there is no such file.

Any other status is an error, a 3xx too (redirects are not followed). A file is read up to
`max_bytes` (16 GiB) and within the time `_HttpService._body` allows.
"""

from __future__ import annotations

import logging
import time
from typing import IO, Any, Literal
from urllib.parse import quote

import httpx

from flame.clients.token import TokenError, TokenSource, source_service_name
from flame.data.sources._http import (
    DEFAULT_SPOOL_THRESHOLD,
    MAX_FILE_BYTES,
    HttpStatusError,
    _check_name,
    _HttpService,
    _spool,
)
from flame.errors import DataError
from flame.utils.deadline import call_left

__all__ = ["HttpFileSource"]

log = logging.getLogger(__name__)

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
        max_bytes: int = MAX_FILE_BYTES,
        **options: Any,
    ) -> None:
        super().__init__(name, base_url, tokens, **options)
        self.spool_threshold = spool_threshold
        self.max_bytes = max_bytes

    def files(self) -> list[str]:
        names = self._json("GET", self.base_url)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(
                f"data source {self.name!r}: GET {self._base.path} must return a JSON list of names"
            )
        return sorted(_check_name(self.name, n) for n in names)

    def open(self, name: str) -> IO[bytes]:
        """The file, streamed into memory up to the spool threshold, to a temp file above;
        at most `max_bytes`, within the time `_body` allows."""
        _check_name(self.name, name)
        url = self.base_url + quote(name, safe="/")
        where = self._where("GET", httpx.URL(url))
        attempt = 0
        while True:
            response = self._request("GET", url, accept="*/*")
            spool = _spool(self.spool_threshold)
            try:
                self._body(response, where, spool, time.monotonic(), self.max_bytes)
            except httpx.TransportError as exc:
                spool.close()
                problem = f"download interrupted ({type(exc).__name__})"
                if attempt >= self.retries:
                    raise DataError(
                        f"{where} -> {problem} (after {attempt + 1} attempts)"
                    ) from None
                delay = self._delay(attempt, None)
                if delay >= call_left():
                    raise DataError(f"{where} -> {problem} (no time left for a retry)") from None
                attempt += 1
                log.warning("%s -> %s; retry in %.2f s", where, problem, delay)
                time.sleep(delay)
                continue
            except BaseException:
                spool.close()
                raise
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

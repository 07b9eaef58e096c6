"""Files over HTTP: a JSON index at the base URL, each file below it.

The protocol (any static server with a JSON index can serve it):

* `GET {base}/` returns a JSON array of file names, relative and '/'-separated;
* `GET {base}/{name}` (each path segment percent-encoded) returns the file's bytes, 404
  when there is no such file.
"""

from __future__ import annotations

import logging
import time
from typing import IO, Any, Literal
from urllib.parse import quote

import httpx

from flame.clients.token import TokenError, TokenSource, source_service_name
from flame.data.sources._http import (
    CHUNK_SIZE,
    DEFAULT_SPOOL_THRESHOLD,
    HttpStatusError,
    _check_name,
    _HttpService,
    _spool,
)
from flame.errors import DataError

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

"""A total time limit for one HTTP exchange, enforced at every socket read and write.

httpx's timeouts are per socket operation: a server sending one header byte every 0.3 s never
trips a 1 s read timeout and can hold the caller for ever. The data sources' client uses this
network backend; `_HttpService._request` sets the exchange's deadline (what is left of the
call, plus a small grace) for the calling thread, and each read or write is given at most the
time left before it, and refused once it has passed (httpx reports a timeout).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx

__all__ = ["deadline", "deadline_client"]

_local = threading.local()
_unbounded_said = threading.Event()
log = logging.getLogger(__name__)


@contextlib.contextmanager
def deadline(at: float) -> Iterator[None]:
    """Socket operations of this thread's exchanges end by `at` (time.monotonic)."""
    previous = getattr(_local, "at", None)
    _local.at = at if previous is None else min(at, previous)
    try:
        yield
    finally:
        _local.at = previous


def _bounded(timeout: float | None, error: type[Exception]) -> float | None:
    at: float | None = getattr(_local, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise error("the exchange's time limit passed")
    return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, bounded))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _Stream(self._inner.connect_tcp(host, port, bounded, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _Stream(self._inner.connect_unix_socket(path, bounded, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def deadline_client(timeout: float) -> httpx.Client:
    """An httpx client (no redirects) whose exchanges honour `deadline`."""
    transport = httpx.HTTPTransport()
    pool: Any = getattr(transport, "_pool", None)
    if pool is not None and hasattr(pool, "_network_backend"):
        pool._network_backend = _Backend()
    elif not _unbounded_said.is_set():  # an httpx without the pool this reaches into
        _unbounded_said.set()
        log.warning(
            "this httpx (%s) has no network backend to bound: a data API's headers are "
            "bounded per read only, not by the call's time limit",
            httpx.__version__,
        )
    return httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=False, transport=transport)

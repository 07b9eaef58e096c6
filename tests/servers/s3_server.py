"""An S3 server (moto) on a free local port, for MinioStore and S3Source tests."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import httpx
from minio import Minio

ACCESS_KEY = "flame-test-access"
SECRET_KEY = "flame-test-secret-key"
REGION = "us-east-1"


def free_port() -> int:
    """A port the OS considers free right now (bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_WERKZEUG_DRAIN = 10_000_000  # werkzeug.serving: rfile.read(10_000_000) after each response


class _ChunkedDrain:
    """The request stream, with werkzeug's post-response drain read in 64 KiB pieces.

    werkzeug drains a connection the client closed with `rfile.read(10_000_000)`, which
    allocates 10 MB for every such request in this process: in a test measuring flame's
    own peak memory with tracemalloc (the server runs in the test process) that would
    count as flame's. Every other read is passed through unchanged."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def read(self, size: int = -1) -> bytes:
        return bytes(self._inner.read(1 << 16 if size == _WERKZEUG_DRAIN else size))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _moto_server(host: str, port: int) -> Any:
    """moto's ThreadedMotoServer, its request handler draining in small reads."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    class Handler(MotoRequestHandler):  # type: ignore[misc]
        def setup(self) -> None:
            super().setup()
            self.rfile = _ChunkedDrain(self.rfile)

    class Server(ThreadedMotoServer):  # type: ignore[misc]
        def _server_entry(self) -> None:  # moto's own, with the handler above
            app = DomainDispatcherApplication(create_backend_app)
            self._server = make_server(
                self._ip_address, self._port, app, True, request_handler=Handler
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    return Server(ip_address=host, port=port, verbose=False)


class S3Server:
    """moto's ThreadedMotoServer with start()/stop() and a raw minio client for assertions."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        """host:port, as minio and StorageSettings.endpoint want it."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def start(self) -> S3Server:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

        self._server = _moto_server(self.host, self.port)
        self._server.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(f"{self.url}/moto-api/", timeout=1.0)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset endpoint)."""
        httpx.post(f"{self.url}/moto-api/reset", timeout=5.0)

    def client(self) -> Minio:
        """A plain minio client: what a test uses to look at or tamper with objects."""
        return Minio(
            self.endpoint,
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            secure=False,
            region=REGION,
        )

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """StorageSettings fields pointing at this server."""
        values: dict[str, Any] = {
            "endpoint": self.endpoint,
            "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY,
            "secure": False,
            "region": REGION,
            "timeout": 10.0,
        }
        values.update(overrides)
        return values

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

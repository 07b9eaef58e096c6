"""The minio client behind `MinioStore`: endpoint parsing, timeouts, retries, TLS trust and
credentials that pick up a rotated session token without rebuilding the client."""

from __future__ import annotations

import os

import certifi
import urllib3
from minio import Minio
from minio.credentials.credentials import Credentials
from minio.credentials.providers import Provider

from flame.clients.object_store import StorageError
from flame.clients.token import TokenSource

__all__ = ["make_minio_client", "parse_endpoint"]


def parse_endpoint(url: str, default_secure: bool = True) -> tuple[str, bool]:
    """`host:port` and TLS flag from `http(s)://host:port` or a bare `host:port`."""
    text = url.strip()
    secure = default_secure
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme not in ("http", "https"):
            raise StorageError(f"storage endpoint {url!r} must use http or https")
        secure = scheme == "https"
    text = text.rstrip("/")
    if not text or "/" in text or "?" in text or "@" in text:
        raise StorageError(f"storage endpoint {url!r} must be host[:port] without a path")
    return text, secure


class _RotatingCredentials(Provider):
    """Static keys plus a session token read from its source on every request.

    minio asks the provider for credentials per request, so a rotated token file is picked
    up without rebuilding the client.
    """

    def __init__(self, access_key: str, secret_key: str, tokens: TokenSource) -> None:
        self._access_key = access_key
        self._secret_key = secret_key
        self._tokens = tokens

    def retrieve(self) -> Credentials:
        return Credentials(self._access_key, self._secret_key, self._tokens.get())


def make_minio_client(
    endpoint: str,
    *,
    access_key: str | None,
    secret_key: str | None,
    secure: bool,
    region: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    token_source: TokenSource | None = None,
) -> Minio:
    """A minio client whose every call has connect/read timeouts and bounded retries.

    urllib3 retries connection errors and 5xx with backoff; minio never sees an endless
    hang. The final 5xx is passed back to minio (`raise_on_status=False`) so it becomes an
    `S3Error` / `ServerError` with the service's error code.
    """
    pool = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=min(timeout, 10.0), read=timeout),
        retries=urllib3.Retry(
            total=retries,
            backoff_factor=0.2,
            backoff_max=10.0,
            status_forcelist=(500, 502, 503, 504),
            raise_on_status=False,
            respect_retry_after_header=True,
        ),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
    )
    credentials = None
    if token_source is not None and token_source.configured and access_key and secret_key:
        credentials = _RotatingCredentials(access_key, secret_key, token_source)
    return Minio(
        endpoint,
        access_key=access_key if credentials is None else None,
        secret_key=secret_key if credentials is None else None,
        secure=secure,
        region=region,
        http_client=pool,
        credentials=credentials,
    )

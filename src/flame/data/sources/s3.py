"""Objects under an S3 / MinIO bucket prefix as a file source.

A read has the HTTP file source's bounds: at most `max_bytes` (16 GiB), within `timeout`
plus its size at `MIN_RATE`, and never past the `call_deadline` (what is left of a node's
epoch); the body is read as it arrives, so a trickling server is stopped between bytes.
"""

from __future__ import annotations

import time
from typing import IO, Any, Literal

from minio.error import MinioException, S3Error
from urllib3.exceptions import HTTPError as Urllib3Error

from flame.clients.minio_client import make_minio_client, parse_endpoint
from flame.clients.object_store import StorageError
from flame.clients.token import TokenError, TokenSource, source_service_name
from flame.config import DataSourceSettings
from flame.data.sources._http import (
    CHUNK_SIZE,
    DEFAULT_SPOOL_THRESHOLD,
    MAX_FILE_BYTES,
    _check_name,
    _spool,
    check_progress,
)
from flame.errors import DataError
from flame.utils.deadline import call_left

__all__ = ["S3Source"]


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
        timeout: float = 30.0,
        max_bytes: int = MAX_FILE_BYTES,
    ) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.name = name
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.spool_threshold = spool_threshold
        self.timeout = timeout
        self.max_bytes = max_bytes

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
        return cls(
            settings.name, client, settings.bucket, settings.prefix, timeout=settings.timeout
        )

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
        """The object, spooled, within the bounds the module names."""
        key = self.prefix + _check_name(self.name, name)
        where = f"data source {self.name!r}: s3://{self.bucket}/{key}"
        if call_left() <= 0:
            raise DataError(f"{where}: no time left before the epoch's deadline")
        spool = _spool(self.spool_threshold)
        started = time.monotonic()
        try:
            response = self.client.get_object(self.bucket, key)
            try:
                got = 0
                # read1: what has arrived (read(n) waits for n bytes, a trickle fills it slowly)
                read = getattr(response, "read1", None) or response.read
                while chunk := read(CHUNK_SIZE):
                    got += len(chunk)
                    check_progress(where, got, started, self.timeout, self.max_bytes)
                    spool.write(chunk)
            except DataError:
                spool.close()
                raise
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

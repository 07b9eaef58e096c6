"""Objects under an S3 / MinIO bucket prefix as a file source."""

from __future__ import annotations

from typing import IO, Any, Literal

from minio.error import MinioException, S3Error
from urllib3.exceptions import HTTPError as Urllib3Error

from flame.clients.minio_client import make_minio_client, parse_endpoint
from flame.clients.object_store import StorageError
from flame.clients.token import TokenError, TokenSource, source_service_name
from flame.config import DataSourceSettings
from flame.data.sources._http import CHUNK_SIZE, DEFAULT_SPOOL_THRESHOLD, _check_name, _spool
from flame.errors import DataError

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

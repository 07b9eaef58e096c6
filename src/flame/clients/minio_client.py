"""`MinioStore`: results, checkpoints and node state in a MinIO / S3 bucket.

Every object is written with its SHA-256 in user metadata (`x-amz-meta-flame-sha256`) and
checked on every read, so a resumed run can trust what an earlier one left. S3 fixes an
object's metadata when the upload *starts*, so the hash must be known before the first byte
goes out:

* `put_bytes` hashes the buffer in place (no copy) and uploads it as a stream of parts;
* `put_file` and `put_stream` on a seekable stream read the data twice: once to hash, once
  to upload. Reading a local file twice is cheap, and it keeps one upload per object, so no
  reader ever sees the final key without its checksum;
* `put_stream` on a non-seekable stream spools it (memory up to a threshold, then a temp
  file) while hashing, then uploads the spool. The alternative, uploading to a temporary key
  and server-side copying with new metadata, doubles the server's I/O and leaves debris
  behind a crash; local disk is the cheaper resource on a node.

Large objects go up in multipart parts of a few MiB, so memory stays bounded by the part
size, never by the object.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, NoReturn

from minio import Minio
from minio.error import MinioException, S3Error, ServerError
from urllib3.exceptions import HTTPError as Urllib3Error

from flame.clients.file_store import CHUNK_SIZE, OVER_LIMIT, FileStore, atomic_writer, read_chunks
from flame.clients.minio_connect import make_minio_client, parse_endpoint
from flame.clients.object_store import (
    MAX_JSON_BYTES,
    SHA256_META,
    AnalysisLayout,
    IntegrityError,
    ObjectNotFound,
    ObjectStore,
    Payload,
    StorageError,
    StoredObject,
    StrPath,
    as_buffer,
    decode_json,
    encode_json,
    validate_key,
    validate_metadata,
    validate_prefix,
)
from flame.clients.token import TokenError, TokenSource
from flame.config import StorageSettings

__all__ = [
    "AnalysisLayout",
    "MinioStore",
    "ObjectStore",
    "StoredObject",
    "make_minio_client",
    "open_store",
    "parse_endpoint",
]

log = logging.getLogger(__name__)

SPOOL_THRESHOLD = 16 * 1024 * 1024
_META_HEADER = f"x-amz-meta-{SHA256_META}"
_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
}
_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"}


class _BufferReader:
    """A read-only stream over a memoryview, so uploads slice parts without a full copy."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        total = len(self._view)
        end = total if size is None or size < 0 else min(total, self._pos + size)
        chunk = bytes(self._view[self._pos : end])
        self._pos = end
        return chunk


def _hash_stream(key: str, stream: IO[bytes]) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    for chunk in read_chunks(key, stream):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


class MinioStore:
    """Objects under `prefix` in one bucket; keys passed in are relative to the prefix."""

    def __init__(
        self,
        client: Minio,
        bucket: str,
        prefix: str = "",
        *,
        region: str | None = None,
        endpoint: str = "",
        spool_threshold: int = SPOOL_THRESHOLD,
    ) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        validate_prefix(prefix)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.region = region
        self.endpoint = endpoint
        self.spool_threshold = spool_threshold

    @classmethod
    def from_settings(
        cls, settings: StorageSettings, token_source: TokenSource | None = None
    ) -> MinioStore:
        if settings.endpoint is None:
            raise StorageError("storage: no endpoint configured")
        endpoint, secure = parse_endpoint(settings.endpoint, settings.secure)
        tokens = token_source if token_source is not None else TokenSource(settings, "storage")
        secret = settings.secret_key.get_secret_value() if settings.secret_key else None
        client = make_minio_client(
            endpoint,
            access_key=settings.access_key,
            secret_key=secret,
            secure=secure,
            region=settings.region,
            timeout=settings.timeout,
            token_source=tokens,
        )
        return cls(
            client, settings.bucket, settings.prefix, region=settings.region, endpoint=endpoint
        )

    def __repr__(self) -> str:
        return f"MinioStore({self.endpoint!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"

    # -- helpers ----------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _fail(self, exc: Exception, key: str | None, action: str) -> NoReturn:
        """Turn a minio / urllib3 error into a flame error naming bucket and key, no secrets."""
        where = f"storage {self.bucket}/{self.prefix}{key}" if key else f"storage {self.bucket}"
        if isinstance(exc, S3Error):
            if exc.code in _MISSING_CODES:
                raise ObjectNotFound(f"{where}: no such object") from None
            if exc.code == "NoSuchBucket":
                raise StorageError(f"storage: bucket {self.bucket!r} does not exist") from None
            if exc.code in _AUTH_CODES:
                raise StorageError(f"{where}: {action} refused ({exc.code})") from None
            raise StorageError(f"{where}: {action} failed ({exc.code})") from None
        if isinstance(exc, ServerError):
            raise StorageError(f"{where}: {action} failed (HTTP {exc.status_code})") from None
        if isinstance(exc, Urllib3Error):
            reason = getattr(exc, "reason", None) or exc
            raise StorageError(
                f"{where}: cannot reach {self.endpoint or 'endpoint'} ({type(reason).__name__})"
            ) from None
        if isinstance(exc, ValueError):  # minio's own argument checks, e.g. bucket names
            raise StorageError(f"{where}: {action} failed: {exc}") from None
        raise StorageError(f"{where}: {action} failed ({type(exc).__name__})") from None

    def _meta(self, digest: str, metadata: Mapping[str, str] | None) -> dict[str, str]:
        return {SHA256_META: digest, **validate_metadata(metadata)}

    # -- service ----------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        try:
            if self.client.bucket_exists(self.bucket):
                return
            self.client.make_bucket(self.bucket, location=self.region)
        except S3Error as exc:
            if exc.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return  # another node created it first
            self._fail(exc, None, "create bucket")
        except (MinioException, Urllib3Error, ValueError) as exc:
            self._fail(exc, None, "create bucket")

    def probe(self) -> None:
        """Check reachability, credentials and the bucket; bad credentials raise TokenError."""
        try:
            found = self.client.bucket_exists(self.bucket)
        except S3Error as exc:
            if exc.code in _AUTH_CODES:
                raise TokenError("storage", f"credentials rejected ({exc.code})") from None
            self._fail(exc, None, "probe")
        except (MinioException, Urllib3Error, ValueError) as exc:
            self._fail(exc, None, "probe")
        if not found:
            raise StorageError(f"storage: bucket {self.bucket!r} does not exist")

    # -- writing ----------------------------------------------------------------------------

    def _upload(
        self,
        key: str,
        stream: Any,
        size: int,
        digest: str,
        metadata: Mapping[str, str] | None,
        content_type: str = "application/octet-stream",
    ) -> StoredObject:
        meta = self._meta(digest, metadata)
        try:
            self.client.put_object(
                self.bucket,
                self._full(key),
                stream,
                length=size,
                content_type=content_type,
                metadata=dict(meta),
            )
        except (MinioException, Urllib3Error, ValueError, OSError) as exc:
            self._fail(exc, key, "upload")
        user = {k: v for k, v in meta.items() if k != SHA256_META}
        return StoredObject(self.bucket, key, digest, size, self._uri(key), user)

    def put_bytes(
        self,
        key: str,
        data: Payload,
        metadata: Mapping[str, str] | None = None,
        *,
        content_type: str = "application/octet-stream",
    ) -> StoredObject:
        view = as_buffer(data)
        digest = hashlib.sha256(view).hexdigest()
        return self._upload(key, _BufferReader(view), len(view), digest, metadata, content_type)

    def put_file(
        self, key: str, path: StrPath, metadata: Mapping[str, str] | None = None
    ) -> StoredObject:
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below; errors mapped first
        except OSError as exc:
            raise StorageError(f"{key}: cannot read {path}: {exc.strerror}") from None
        with handle:
            return self.put_stream(key, handle, metadata)

    def put_stream(
        self, key: str, stream: IO[bytes], metadata: Mapping[str, str] | None = None
    ) -> StoredObject:
        validate_key(key)
        seekable = False
        try:
            seekable = stream.seekable()
        except (AttributeError, OSError):
            seekable = False
        if seekable:
            start = stream.tell()
            digest, size = _hash_stream(key, stream)
            stream.seek(start)
            stored = self._upload(key, stream, size, digest, metadata)
            if stream.tell() != start + size:
                self.delete(key)
                raise StorageError(f"{key}: the stream changed while it was uploaded")
            return stored
        with tempfile.SpooledTemporaryFile(max_size=self.spool_threshold) as spool:
            hasher = hashlib.sha256()
            size = 0
            for chunk in read_chunks(key, stream):
                hasher.update(chunk)
                spool.write(chunk)
                size += len(chunk)
            spool.seek(0)
            return self._upload(key, spool, size, hasher.hexdigest(), metadata)

    def put_json(self, key: str, value: Any) -> StoredObject:
        return self.put_bytes(key, encode_json(key, value), content_type="application/json")

    # -- reading ----------------------------------------------------------------------------

    def stat(self, key: str) -> StoredObject:
        try:
            info = self.client.stat_object(self.bucket, self._full(key))
        except (MinioException, Urllib3Error, ValueError) as exc:
            self._fail(exc, key, "stat")
        headers = info.metadata or {}
        digest = headers.get(_META_HEADER)
        if not digest:
            raise IntegrityError(f"storage {self.bucket}/{self._full(key)}: no SHA-256 metadata")
        user = {
            name.lower()[len("x-amz-meta-") :]: str(value)
            for name, value in headers.items()
            if name.lower().startswith("x-amz-meta-") and name.lower() != _META_HEADER
        }
        size = int(info.size or 0)
        return StoredObject(self.bucket, key, str(digest), size, self._uri(key), user)

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        full = self._full(key)
        try:
            response = self.client.get_object(self.bucket, full)
        except (MinioException, Urllib3Error, ValueError) as exc:
            self._fail(exc, key, "download")
        try:
            expected = response.headers.get(_META_HEADER)
            if max_bytes is None:
                data = response.read()
            else:  # the declared length first, then never more than the limit read
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    size = int(declared)
                    raise StorageError(OVER_LIMIT.format(key=key, size=size, limit=max_bytes))
                data = response.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise StorageError(f"{key}: an object over the {max_bytes} bytes expected")
        except (Urllib3Error, OSError) as exc:
            self._fail(exc, key, "download")
        finally:
            response.close()
            response.release_conn()
        if not expected:
            raise IntegrityError(f"storage {self.bucket}/{full}: no SHA-256 metadata")
        if hashlib.sha256(data).hexdigest() != expected:
            raise IntegrityError(f"storage {self.bucket}/{full}: SHA-256 mismatch")
        return data

    def get_to_file(self, key: str, path: StrPath) -> StoredObject:
        full = self._full(key)
        try:
            response = self.client.get_object(self.bucket, full)
        except (MinioException, Urllib3Error, ValueError) as exc:
            self._fail(exc, key, "download")
        try:
            expected = response.headers.get(_META_HEADER)
            if not expected:
                raise IntegrityError(f"storage {self.bucket}/{full}: no SHA-256 metadata")
            digest = hashlib.sha256()
            size = 0
            with atomic_writer(Path(path)) as out:
                for chunk in response.stream(CHUNK_SIZE):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                if digest.hexdigest() != expected:
                    raise IntegrityError(f"storage {self.bucket}/{full}: SHA-256 mismatch")
        except Urllib3Error as exc:
            self._fail(exc, key, "download")
        except OSError as exc:
            raise StorageError(f"{key}: cannot write {path}: {exc.strerror}") from None
        finally:
            response.close()
            response.release_conn()
        return StoredObject(self.bucket, key, str(expected), size, self._uri(key))

    def get_json(self, key: str) -> Any:
        return decode_json(key, self.get_bytes(key, max_bytes=MAX_JSON_BYTES))

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, self._full(key))
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                return False
            self._fail(exc, key, "stat")
        except (MinioException, Urllib3Error, ValueError) as exc:
            self._fail(exc, key, "stat")
        return True

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        try:
            names = [
                obj.object_name
                for obj in self.client.list_objects(
                    self.bucket, prefix=self.prefix + prefix, recursive=True
                )
                if obj.object_name is not None and not obj.is_dir
            ]
        except (MinioException, Urllib3Error, ValueError) as exc:
            self._fail(exc, prefix or None, "list")
        return sorted(name[len(self.prefix) :] for name in names)

    def delete(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, self._full(key))
        except (MinioException, Urllib3Error, ValueError) as exc:
            self._fail(exc, key, "delete")

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under `prefix`; returns how many were removed."""
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)


def open_store(
    settings: StorageSettings, token_source: TokenSource | None = None
) -> ObjectStore | None:
    """The store the config asks for: S3 when an endpoint is set, else a local folder if
    `results_dir` is set, else None (nothing is persisted)."""
    if settings.endpoint is not None:
        return MinioStore.from_settings(settings, token_source)
    if settings.results_dir is not None:
        return FileStore(settings.results_dir)
    return None

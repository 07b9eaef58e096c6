"""`FileStore`: the object store on a local folder, for `flame simulate` and single machines.

It keeps the same contract as `MinioStore` (keys, SHA-256 verified on read, streaming) so the
federated layer runs unchanged with or without S3. Objects are plain files under the root,
so a user can open `final/result.bin` directly; their checksums live in a hidden index
(`.flame-index/<key>.json`). Writes go to a temporary file in the same folder and are renamed
into place, so a crash never leaves a half-written checkpoint under its real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from flame.clients.object_store import (
    MAX_JSON_BYTES,
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

__all__ = [
    "CHUNK_SIZE",
    "FileStore",
    "ObjectStore",
    "StoredObject",
    "atomic_writer",
    "read_chunks",
]

CHUNK_SIZE = 1024 * 1024
INDEX_DIR = ".flame-index"
OVER_LIMIT = "{key}: an object of {size} bytes, over the {limit} expected: not read"
_MISMATCH = "{key}: SHA-256 mismatch (object changed after it was written)"


@contextmanager
def atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """A file that appears under `path` only once fully written and flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def read_chunks(key: str, stream: IO[bytes]) -> Iterator[bytes]:
    """The stream's chunks; a failing *source* is reported as such, not as a storage fault."""
    while True:
        try:
            chunk = stream.read(CHUNK_SIZE)
        except OSError as exc:
            raise StorageError(f"{key}: cannot read the source stream: {exc}") from None
        if not chunk:
            return
        yield chunk


class FileStore:
    """Objects as files under `root`; see the module docstring for the on-disk layout."""

    def __init__(self, root: StrPath) -> None:
        self.root = Path(root)
        self.bucket = ""

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    # -- paths ------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _index(self, key: str) -> Path:
        return self.root / INDEX_DIR / f"{validate_key(key)}.json"

    def _uri(self, key: str) -> str:
        return self._path(key).resolve().as_uri()

    # -- service ----------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"storage folder {self.root}: {exc.strerror}") from None

    def probe(self) -> None:
        if not self.root.is_dir():
            raise StorageError(f"storage folder {self.root} does not exist")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"storage folder {self.root} is not writable")

    # -- writing ----------------------------------------------------------------------------

    def _write_index(self, key: str, digest: str, size: int, metadata: dict[str, str]) -> None:
        record = {"sha256": digest, "size": size, "metadata": metadata}
        with atomic_writer(self._index(key)) as handle:
            handle.write(json.dumps(record, sort_keys=True).encode())

    def _put_chunks(
        self, key: str, chunks: Iterator[bytes | memoryview], metadata: Mapping[str, str] | None
    ) -> StoredObject:
        meta = validate_metadata(metadata)
        path = self._path(key)
        digest = hashlib.sha256()
        size = 0
        try:
            with atomic_writer(path) as handle:
                for chunk in chunks:
                    digest.update(chunk)
                    handle.write(chunk)
                    size += len(chunk)
            self._write_index(key, digest.hexdigest(), size, meta)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise StorageError(f"{key}: cannot write under {self.root}: {reason}") from None
        return StoredObject(self.bucket, key, digest.hexdigest(), size, self._uri(key), meta)

    def put_bytes(
        self,
        key: str,
        data: Payload,
        metadata: Mapping[str, str] | None = None,
    ) -> StoredObject:
        view = as_buffer(data)
        return self._put_chunks(key, iter([view]), metadata)

    def put_stream(
        self, key: str, stream: IO[bytes], metadata: Mapping[str, str] | None = None
    ) -> StoredObject:
        return self._put_chunks(key, read_chunks(key, stream), metadata)

    def put_file(
        self, key: str, path: StrPath, metadata: Mapping[str, str] | None = None
    ) -> StoredObject:
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below; errors mapped first
        except OSError as exc:
            raise StorageError(f"{key}: cannot read {path}: {exc.strerror}") from None
        with handle:
            return self.put_stream(key, handle, metadata)

    def put_json(self, key: str, value: Any) -> StoredObject:
        return self.put_bytes(key, encode_json(key, value), {})

    # -- reading ----------------------------------------------------------------------------

    def stat(self, key: str) -> StoredObject:
        index = self._index(key)
        if not self._path(key).is_file():
            raise ObjectNotFound(f"{key}: no such object in {self.root}")
        try:
            record = json.loads(index.read_bytes())
            digest, size = str(record["sha256"]), int(record["size"])
            meta = {str(k): str(v) for k, v in dict(record.get("metadata", {})).items()}
        except FileNotFoundError:
            raise IntegrityError(f"{key}: object has no recorded SHA-256") from None
        except (OSError, ValueError, KeyError, TypeError):
            raise IntegrityError(f"{key}: checksum index entry is unreadable") from None
        return StoredObject(self.bucket, key, digest, size, self._uri(key), meta)

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        for attempt in (1, 2):
            expected = self.stat(key)
            if max_bytes is not None and expected.size > max_bytes:
                raise StorageError(OVER_LIMIT.format(key=key, size=expected.size, limit=max_bytes))
            try:
                data = self._path(key).read_bytes()
            except FileNotFoundError:
                raise ObjectNotFound(f"{key}: no such object in {self.root}") from None
            except OSError as exc:
                raise StorageError(f"{key}: cannot read: {exc.strerror}") from None
            if hashlib.sha256(data).hexdigest() == expected.sha256 and len(data) == expected.size:
                return data
            if attempt == 1:
                continue  # a writer may have replaced the object between index and data reads
        raise IntegrityError(_MISMATCH.format(key=key))

    def get_to_file(self, key: str, path: StrPath) -> StoredObject:
        expected = self.stat(key)
        target = Path(path)
        digest = hashlib.sha256()
        size = 0
        try:
            with atomic_writer(target) as out, self._path(key).open("rb") as src:
                for chunk in iter(lambda: src.read(CHUNK_SIZE), b""):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                if digest.hexdigest() != expected.sha256 or size != expected.size:
                    raise IntegrityError(_MISMATCH.format(key=key))
        except FileNotFoundError:
            raise ObjectNotFound(f"{key}: no such object in {self.root}") from None
        except OSError as exc:
            raise StorageError(f"{key}: cannot copy to {target}: {exc.strerror}") from None
        return expected

    def get_json(self, key: str) -> Any:
        return decode_json(key, self.get_bytes(key, max_bytes=MAX_JSON_BYTES))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        if not self.root.is_dir():
            return []
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        for path in (self._path(key), self._index(key)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StorageError(f"{key}: cannot delete: {exc.strerror}") from None

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under `prefix`; returns how many were removed."""
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

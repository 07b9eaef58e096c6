"""The storage interface the federated layer depends on, and the key layout of an analysis.

Two implementations satisfy `ObjectStore`: `MinioStore` (MinIO / S3, production) and
`FileStore` (a local folder, `flame simulate`). Keys are relative to the store's own prefix
or root, '/'-separated; every object carries its SHA-256, checked on every read, because a
checkpoint or result that silently changed would make a resumed run disagree with the
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, runtime_checkable

import numpy as np

from flame.errors import FlameError

__all__ = [
    "AnalysisLayout",
    "IntegrityError",
    "MAX_JSON_BYTES",
    "ObjectNotFound",
    "ObjectStore",
    "SHA256_META",
    "StorageError",
    "Payload",
    "StrPath",
    "as_buffer",
    "decode_json",
    "encode_json",
    "StoredObject",
    "validate_key",
    "validate_metadata",
]

SHA256_META = "flame-sha256"
"""User-metadata name of the object's SHA-256 (S3 sends it as `x-amz-meta-flame-sha256`)."""

MAX_JSON_BYTES = 16 << 20
"""The most `get_json` reads of one record (manifest, checkpoint, log lines): a planted
giant object under a record's key is refused before it is read into memory."""
_MAX_JSON_DEPTH = 64  # flame's records nest a few levels; a planted one may nest 100,000

StrPath = str | os.PathLike[str]
Payload = bytes | bytearray | memoryview | np.ndarray
"""What `put_bytes` takes: numpy arrays go up without a copy when C-contiguous."""

_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._=+@,-]*$")
_ID = re.compile(r"^[A-Za-z0-9._-]+$")
_META_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_EPOCH = re.compile(r"^[0-9]{6}\Z")  # `epoch_prefix`'s f"{epoch:06d}" for 0 <= epoch < 10**6


class StorageError(FlameError):
    """Storage could not be reached, or refused or failed an operation."""


class ObjectNotFound(StorageError):
    """No object under that key (a checkpoint that was never written, for instance)."""


class IntegrityError(StorageError):
    """An object's bytes do not match the SHA-256 recorded when it was written."""


@dataclass(frozen=True)
class StoredObject:
    """Where an object lives and what it must hash to: what a claim-check message carries."""

    bucket: str
    key: str
    sha256: str
    size: int
    uri: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict, compare=False)


def as_buffer(data: Payload) -> memoryview:
    """A flat byte view of `data`; a non-contiguous array is copied once to make it flat."""
    if isinstance(data, np.ndarray):
        if data.dtype.hasobject:
            raise StorageError("arrays of Python objects cannot be stored as bytes")
        return np.ascontiguousarray(data).data.cast("B")
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def validate_key(key: str) -> str:
    """Refuse keys that could escape a FileStore root or collide with its hidden index.

    Segments may not start with '.', which rules out '..' and reserves dot-names for the
    store's own bookkeeping; the same rule on S3 keeps both stores interchangeable.
    """
    if not key or key.startswith("/") or key.endswith("/") or "\\" in key:
        raise StorageError(f"invalid object key {key!r}")
    for segment in key.split("/"):
        if not _SEGMENT.match(segment):
            raise StorageError(f"invalid object key {key!r} (segment {segment!r})")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key-like path that may end in '/'."""
    if not prefix:
        return prefix
    validate_key(prefix.rstrip("/") or "x")
    if prefix.startswith("/"):
        raise StorageError(f"invalid prefix {prefix!r}")
    return prefix


def validate_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """User metadata both stores can keep: lowercase ASCII names, printable ASCII values."""
    if not metadata:
        return {}
    clean: dict[str, str] = {}
    for name, value in metadata.items():
        if not _META_NAME.match(name) or name == SHA256_META:
            raise StorageError(f"invalid metadata name {name!r}")
        if not isinstance(value, str) or not value.isascii() or not value.isprintable():
            raise StorageError(f"metadata {name!r} must be printable ASCII text")
        clean[name] = value
    return clean


@runtime_checkable
class ObjectStore(Protocol):
    """What the federated layer needs from storage; keys are relative to the store."""

    def ensure_bucket(self) -> None:
        """Create the bucket / root folder if it is missing (idempotent, race-safe)."""
        ...

    def probe(self) -> None:
        """Raise a `StorageError` (or `TokenError` for rejected credentials) unless usable."""
        ...

    def put_bytes(
        self,
        key: str,
        data: Payload,
        metadata: Mapping[str, str] | None = None,
    ) -> StoredObject: ...

    def put_file(
        self, key: str, path: StrPath, metadata: Mapping[str, str] | None = None
    ) -> StoredObject: ...

    def put_stream(
        self, key: str, stream: IO[bytes], metadata: Mapping[str, str] | None = None
    ) -> StoredObject: ...

    def put_json(self, key: str, value: Any) -> StoredObject: ...

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """The object's bytes, verified against its SHA-256 (IntegrityError otherwise).
        `max_bytes`: refused (StorageError) before more than that is read into memory."""
        ...

    def get_to_file(self, key: str, path: StrPath) -> StoredObject:
        """Stream the object to `path` (atomically replaced), verified before it appears."""
        ...

    def get_json(self, key: str) -> Any: ...

    def stat(self, key: str) -> StoredObject:
        """Size, SHA-256 and metadata without reading the bytes (ObjectNotFound if absent)."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` (recursive), sorted."""
        ...

    def delete(self, key: str) -> None:
        """Remove an object; removing a missing object is not an error."""
        ...


@dataclass(frozen=True)
class AnalysisLayout:
    """The keys of one analysis, so no other module builds storage keys by hand.

    ```
    {analysis_id}/epochs/{epoch:06d}/{node}.bin        a node's result of that epoch
    {analysis_id}/epochs/{epoch:06d}/checkpoint.json   the aggregator's state after it
    {analysis_id}/final/result.bin                     the final aggregate
    {analysis_id}/final/manifest.json                  provenance
    {analysis_id}/nodes/{node}/state/{tag}             node-local state of the analyst
    {analysis_id}/nodes/{node}/runtime/{tag}           the runtime's own (threshold guard)
    {analysis_id}/payloads/{sender}/{message_id}.bin   claim-checked message payloads
    ```
    Epochs are zero-padded so a plain lexicographic listing is in epoch order.
    """

    analysis_id: str

    def __post_init__(self) -> None:
        _check_id("analysis id", self.analysis_id)

    @property
    def root(self) -> str:
        return f"{self.analysis_id}/"

    def epoch_prefix(self, epoch: int) -> str:
        if not 0 <= epoch < 1_000_000:
            raise StorageError(f"epoch {epoch} is out of range")
        return f"{self.analysis_id}/epochs/{epoch:06d}/"

    def epoch_result(self, epoch: int, node: str) -> str:
        _check_id("node id", node)
        if node == "checkpoint":
            raise StorageError("node id 'checkpoint' is reserved")
        return f"{self.epoch_prefix(epoch)}{node}.bin"

    def checkpoint(self, epoch: int) -> str:
        return f"{self.epoch_prefix(epoch)}checkpoint.json"

    def final_result(self) -> str:
        return f"{self.analysis_id}/final/result.bin"

    def manifest(self) -> str:
        return f"{self.analysis_id}/final/manifest.json"

    def node_state(self, node: str, tag: str) -> str:
        _check_id("node id", node)
        _check_id("state tag", tag)
        return f"{self.analysis_id}/nodes/{node}/state/{tag}"

    def node_runtime_state(self, node: str, tag: str) -> str:
        """The runtime's own state of a node (threshold guard): beside, not in, `state/`."""
        _check_id("node id", node)
        _check_id("state tag", tag)
        return f"{self.analysis_id}/nodes/{node}/runtime/{tag}"

    def node_state_prefix(self, node: str) -> str:
        _check_id("node id", node)
        return f"{self.analysis_id}/nodes/{node}/state/"

    def payload(self, sender: str, message_id: str) -> str:
        _check_id("sender", sender)
        _check_id("message id", message_id)
        return f"{self.analysis_id}/payloads/{sender}/{message_id}.bin"

    # -- reading back what earlier epochs or runs left ("old information") ------------------

    def checkpointed_epochs(self, store: ObjectStore) -> list[int]:
        """Epochs with a checkpoint, ascending: only keys exactly as `checkpoint()` writes
        them (six ASCII digits), so a planted `0000099/` or `99/` is not an epoch at all,
        rather than one whose record is then not found under the canonical key."""
        found: list[int] = []
        for key in store.list(f"{self.analysis_id}/epochs/"):
            parts = key.split("/")
            if len(parts) == 4 and parts[3] == "checkpoint.json" and _EPOCH.match(parts[2]):
                found.append(int(parts[2]))
        return sorted(found)

    def latest_checkpoint(self, store: ObjectStore) -> int | None:
        """The last epoch a restarted node can resume after, or None to start from scratch."""
        epochs = self.checkpointed_epochs(store)
        return epochs[-1] if epochs else None

    def epoch_results(self, store: ObjectStore, epoch: int) -> dict[str, str]:
        """node id -> key of every node result stored for `epoch`."""
        prefix = self.epoch_prefix(epoch)
        results: dict[str, str] = {}
        for key in store.list(prefix):
            name = key[len(prefix) :]
            if "/" not in name and name.endswith(".bin"):
                results[name[: -len(".bin")]] = key
        return results

    def node_states(self, store: ObjectStore, node: str) -> list[str]:
        """Tags of the state this node saved."""
        prefix = self.node_state_prefix(node)
        return [key[len(prefix) :] for key in store.list(prefix) if "/" not in key[len(prefix) :]]


def encode_json(key: str, value: Any) -> bytes:
    """Strict JSON (no NaN / Infinity) so any reader, not only Python, can load it."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise StorageError(f"{key}: value is not JSON-serialisable: {exc}") from None


def decode_json(key: str, data: bytes) -> Any:
    """The JSON value of a stored record; StorageError naming `key` for anything that is not
    plain, shallow JSON (a deeply nested planted object must not crash a reader)."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise StorageError(f"{key}: object is not valid JSON") from None
    if _too_deep(value):
        raise StorageError(f"{key}: object nests deeper than {_MAX_JSON_DEPTH} levels")
    return value


def _too_deep(value: Any) -> bool:
    """Whether `value` nests deeper than `_MAX_JSON_DEPTH` (iterative: no recursion)."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            if depth >= _MAX_JSON_DEPTH:
                return True
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return False


def _check_id(what: str, value: str) -> None:
    if not _ID.match(value) or value in (".", "..") or value.startswith("."):
        raise StorageError(f"{what} {value!r} may use only letters, digits, '.', '_', '-'")

"""The wire envelope and its binary encoding; no pickle anywhere.

A frame is `b"FLM" + version byte + u32 header length + JSON header + blobs`. The header holds
the envelope fields and the body as JSON in which numpy arrays and bytes are references to
blobs (`{"$nd": i, "dtype": "<f8", "shape": [..]}`, `{"$b": i}`); tables (pandas, polars,
Arrow) are Arrow IPC blobs and dicts with non-str keys are key/value pairs (`flame.wire.tables`).
User dict keys that start with "$" are escaped by doubling the "$". Decoding validates every
field and reference and raises `MessageError`; callers drop such a message, they never act on it.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast, get_args

import numpy as np

from flame.errors import MessageError
from flame.wire import tables as wire_tables

__all__ = [
    "BROADCAST_KINDS",
    "EVERYONE",
    "KINDS",
    "Envelope",
    "Kind",
    "Sealed",
    "decode",
    "encode",
    "encode_parts",
    "pack",
    "to_jsonable",
    "unpack",
]

FORMAT_VERSION = 1
MAGIC = b"FLM"
_PREFIX = struct.Struct(">3sBI")
DEFAULT_MAX_BYTES = 512 * 1024 * 1024

Kind = Literal[
    "status", "start", "result", "aggregate", "finished", "error", "abort", "message", "ack"
]
KINDS: frozenset[str] = frozenset(get_args(Kind))
EVERYONE = "*"
"""Recipient of one message to every node of the run that listens (the aggregator's kick-offs
and the end, published once instead of once per node); never a node id."""
BROADCAST_KINDS = frozenset({"start", "aggregate", "finished"})
_NAME = r"^[A-Za-z0-9._-]{1,128}$"
_MAX_DEPTH = 100
_DTYPE = re.compile(r"^[<>|=]?(b1|[iu][1248]|f[248]|c(8|16))$")


@dataclass(frozen=True)
class Envelope:
    """One message between nodes. `body` is JSON-like data, numpy arrays and bytes."""

    analysis: str
    sender: str
    recipient: str
    kind: Kind
    epoch: int = 0
    body: Any = None
    category: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    sent: float = field(default_factory=time.time)
    version: int = FORMAT_VERSION
    # The signed message as received (flame.identity.signing), kept so a verified envelope
    # can be forwarded to a third party who checks the sender's signature itself.
    signed: bytes | bytearray | memoryview | None = field(default=None, compare=False, repr=False)
    # Bytes of the frame it was decoded from (None: not received), for the per-node result
    # sizes in the run's history without encoding the message again.
    wire_bytes: int | None = field(default=None, compare=False, repr=False)

    def reply(self, kind: Kind, body: Any = None, **changes: Any) -> Envelope:
        """A new envelope back to this one's sender."""
        if self.recipient == EVERYONE:
            raise ValueError("a broadcast has no single recipient to reply as")
        return replace(
            self,
            sender=self.recipient,
            recipient=self.sender,
            kind=kind,
            body=body,
            id=uuid.uuid4().hex,
            sent=time.time(),
            signed=None,
            wire_bytes=None,
            **changes,
        )


@dataclass(frozen=True)
class Sealed:
    """An opaque encrypted payload (a Paillier ciphertext vector): travels as raw bytes."""

    scheme: str
    data: bytes


@dataclass(frozen=True)
class _Header:
    """A frame's validated JSON header. Checked by hand, not by a pydantic model: every node
    and every isolated analysis child decodes frames, and importing pydantic there cost about
    80 ms of each child's start."""

    id: str
    analysis: str
    sender: str
    recipient: str
    kind: Kind
    epoch: int
    sent: float
    category: str | None
    body: Any
    blobs: list[list[int]]


_ID = re.compile(r"[0-9a-f]{8,64}")
_NAME_PATTERN = re.compile(_NAME[1:-1])
_REQUIRED = ("id", "analysis", "sender", "recipient", "kind", "epoch", "sent")
_OPTIONAL = ("category", "body", "blobs")
_MAX_BLOBS = 100_000
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _is_int(value: Any) -> bool:
    return type(value) is int


def _broadcast_kind(kind: Any) -> bool:
    return isinstance(kind, str) and kind in BROADCAST_KINDS


def _parse_header(raw: Any) -> _Header:
    """The header of `raw` (parsed JSON), or ValueError naming the first bad field."""
    if not isinstance(raw, dict):
        raise ValueError("the header is not a JSON object")
    extra = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if extra:
        raise ValueError(f"{extra[0]}: unknown field")
    for name in _REQUIRED:
        if name not in raw:
            raise ValueError(f"{name}: field required")
    if not isinstance(raw["id"], str) or not _ID.fullmatch(raw["id"]):
        raise ValueError("id: must be 8-64 lowercase hex digits")
    for name in ("analysis", "sender", "recipient"):
        if name == "recipient" and raw[name] == EVERYONE and _broadcast_kind(raw["kind"]):
            continue
        if not isinstance(raw[name], str) or not _NAME_PATTERN.fullmatch(raw[name]):
            raise ValueError(f"{name}: must be 1-128 of A-Z a-z 0-9 . _ -")
    if not isinstance(raw["kind"], str) or raw["kind"] not in KINDS:
        raise ValueError(f"kind: must be one of {', '.join(sorted(KINDS))}")
    epoch = raw["epoch"]
    if not _is_int(epoch) or not -1 <= epoch <= 10_000_000:
        raise ValueError("epoch: must be an integer from -1 to 10000000")
    sent = raw["sent"]
    if type(sent) not in (int, float):
        raise ValueError("sent: must be a number")
    category = raw.get("category")
    if category is not None and (not isinstance(category, str) or len(category) > 256):
        raise ValueError("category: must be a string of at most 256 characters")
    blobs = raw.get("blobs", [])
    if not isinstance(blobs, list) or len(blobs) > _MAX_BLOBS:
        raise ValueError(f"blobs: must be a list of at most {_MAX_BLOBS} entries")
    for entry in blobs:
        if not isinstance(entry, list) or not all(_is_int(x) for x in entry):
            raise ValueError("blobs: every entry must be a list of integers")
    return _Header(
        raw["id"], raw["analysis"], raw["sender"], raw["recipient"], cast(Kind, raw["kind"]), epoch,
        float(sent), category, raw.get("body"), blobs,
    )  # fmt: skip


# --- encoding --------------------------------------------------------------------------------


class _Encoder:
    def __init__(self) -> None:
        self.blobs: list[memoryview] = []

    def blob(self, data: memoryview) -> int:
        self.blobs.append(data)
        return len(self.blobs) - 1

    def value(self, obj: Any, path: str, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise TypeError(f"{path}: nests deeper than {_MAX_DEPTH} levels")
        kind = type(obj)  # exact built-in types first, as the checks below would treat them:
        if kind in _SCALARS:  # the ABC and numpy checks cost more than the value itself
            return obj
        if kind is dict and all(type(key) is str for key in obj):
            return self._mapping(obj, path, depth)
        if kind is list or kind is tuple:
            return [self.value(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(obj)]
        if kind is Sealed:
            return {"$sealed": self.blob(memoryview(obj.data).cast("B")), "scheme": obj.scheme}
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, (int, float)):
            return obj
        if isinstance(obj, np.generic):
            return self.value(obj.item(), path)
        if isinstance(obj, np.ma.MaskedArray):
            raise TypeError(
                f"{path}: a masked array would lose its mask; send .filled() or the mask"
            )
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in "biufc" or not _DTYPE.match(obj.dtype.str):
                raise TypeError(
                    f"{path}: numpy dtype {obj.dtype} cannot be sent: arrays must hold numbers "
                    "(bool, int, uint, float, complex); send text as a list (.tolist()) or a "
                    "table (pandas, polars, Arrow). What can be sent: dicts, lists, numbers, "
                    "strings, bytes, numeric numpy arrays, tables"
                )
            flat = np.ascontiguousarray(obj.reshape(-1))
            index = self.blob(memoryview(flat).cast("B") if flat.size else memoryview(b""))  # type: ignore[arg-type]
            return {"$nd": index, "dtype": obj.dtype.str, "shape": list(obj.shape)}
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return {"$b": self.blob(memoryview(obj).cast("B"))}
        if isinstance(obj, Sealed):
            return {"$sealed": self.blob(memoryview(obj.data).cast("B")), "scheme": obj.scheme}
        if getattr(type(obj), "_flame_kind", None) is not None:  # flame.privacy.markers
            raise TypeError(  # the runtime resolves every marker it sees; never its values
                f"{path}: a {type(obj).__name__} marker (flame.secure, flame.counts or "
                "flame.dp) reached the wire unresolved; put markers in plain dicts and lists "
                "of the value returned, not in tables, sets or other objects"
            )
        if isinstance(obj, Mapping) and not all(isinstance(key, str) for key in obj):
            return {  # a path names a non-str key by its position, never by its text
                "$kd": [
                    [wire_tables.dict_key(k, path), self.value(v, f"{path}[#{i}]", depth + 1)]
                    for i, (k, v) in enumerate(obj.items())
                ]
            }
        if isinstance(obj, Mapping):
            return self._mapping(obj, path, depth)
        if isinstance(obj, (list, tuple)):
            return [self.value(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(obj)]
        table = wire_tables.encode_table(obj, path)
        if table is not None:
            ref, data = table
            return {"$arrow": self.blob(memoryview(data)), **ref}
        raise TypeError(
            f"{path}: a {type(obj).__name__} cannot be sent; use dicts, lists, numbers, "
            "strings, bytes, numpy arrays or tables (pandas, polars, Arrow)"
        )

    def _mapping(self, obj: Mapping[Any, Any], path: str, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, item in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"{path}: a dict key of type {type(key).__name__}; use str keys")
            escaped = "$" + key if key.startswith("$") else key
            out[escaped] = self.value(item, f"{path}.{key}", depth + 1)
        return out


def encode_parts(envelope: Envelope) -> list[bytes | memoryview]:
    """The frame as buffers, so a large array is copied once (by the caller's join/write)."""
    encoder = _Encoder()
    body = encoder.value(envelope.body, "body")
    offsets: list[tuple[int, int]] = []
    position = 0
    for blob in encoder.blobs:
        offsets.append((position, blob.nbytes))
        position += blob.nbytes
    header = {
        "id": envelope.id,
        "analysis": envelope.analysis,
        "sender": envelope.sender,
        "recipient": envelope.recipient,
        "kind": envelope.kind,
        "epoch": envelope.epoch,
        "sent": envelope.sent,
        "category": envelope.category,
        "body": body,
        "blobs": offsets,
    }
    header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=True).encode()
    return [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)), header_bytes, *encoder.blobs]


def encode(envelope: Envelope) -> bytes:
    """The envelope as one frame. Raises TypeError naming the path of a value it cannot send."""
    return b"".join(encode_parts(envelope))


# --- decoding --------------------------------------------------------------------------------


def _decode_value(
    obj: Any, blobs: list[memoryview], writable: bool, limit: int, depth: int = 0
) -> Any:
    if depth > _MAX_DEPTH + 1:
        raise MessageError("body nests too deeply")
    if isinstance(obj, list):
        return [_decode_value(item, blobs, writable, limit, depth + 1) for item in obj]
    if not isinstance(obj, dict):
        return obj
    if "$nd" in obj:
        return _decode_array(obj, blobs, writable)
    if "$arrow" in obj:
        return wire_tables.decode_table(obj, _blob(obj["$arrow"], blobs), limit)
    if "$kd" in obj:
        pairs = obj["$kd"]
        if set(obj) != {"$kd"} or not isinstance(pairs, list):
            raise MessageError("keyed dict must be exactly $kd with a list of pairs")
        keyed: dict[Any, Any] = {}
        for pair in pairs:
            if not isinstance(pair, list) or len(pair) != 2:
                raise MessageError("keyed dict entries must be [key, value] pairs")
            keyed[wire_tables.check_key(pair[0])] = _decode_value(
                pair[1], blobs, writable, limit, depth + 1
            )
        return keyed
    if "$sealed" in obj:
        scheme = obj.get("scheme")
        if set(obj) != {"$sealed", "scheme"} or not isinstance(scheme, str) or len(scheme) > 32:
            raise MessageError("sealed reference must have exactly $sealed and a short scheme")
        return Sealed(scheme, bytes(_blob(obj["$sealed"], blobs)))
    if "$b" in obj:
        if set(obj) != {"$b"}:
            raise MessageError("bytes reference has extra fields")
        return bytes(_blob(obj["$b"], blobs))
    out: dict[str, Any] = {}
    for key, item in obj.items():
        if key.startswith("$"):
            if not key.startswith("$$"):
                raise MessageError(f"unknown reference key {key[:20]!r} in body")
            key = key[1:]
        try:
            out[key] = _decode_value(item, blobs, writable, limit, depth + 1)
        except MessageError as exc:  # name the field that was refused: "body.a.b: ..."
            raise _at(key, exc) from None
    return out


def _at(key: str, exc: MessageError) -> MessageError:
    path, _, detail = str(exc).partition(": ") if str(exc).startswith("body.") else ("", "", "")
    if path:
        inner = path[5:] if len(path) < 300 else path[5:295] + "..."
        return MessageError(f"body.{key[:60]}.{inner}: {detail}")
    return MessageError(f"body.{key[:60]}: {exc}")


def _blob(index: Any, blobs: list[memoryview]) -> memoryview:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(blobs):
        raise MessageError(f"blob reference {index!r} is out of range")
    return blobs[index]


def _decode_array(obj: dict[str, Any], blobs: list[memoryview], writable: bool) -> np.ndarray:
    if set(obj) != {"$nd", "dtype", "shape"}:
        raise MessageError("array reference must have exactly $nd, dtype and shape")
    dtype_text, shape = obj["dtype"], obj["shape"]
    if not isinstance(dtype_text, str) or not _DTYPE.match(dtype_text):
        raise MessageError(f"array dtype {str(dtype_text)[:20]!r} is not an allowed number type")
    if (
        not isinstance(shape, list)
        or len(shape) > 32
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise MessageError("array shape must be a list of at most 32 non-negative integers")
    dtype = np.dtype(dtype_text)
    data = _blob(obj["$nd"], blobs)
    count = 1
    for size in shape:
        count *= size
    if count * dtype.itemsize != data.nbytes:
        raise MessageError(
            f"array of shape {shape} and dtype {dtype_text} needs {count * dtype.itemsize} "
            f"bytes, the message carries {data.nbytes}"
        )
    try:
        array = np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
    except ValueError as exc:
        raise MessageError(f"array of shape {shape[:4]}... cannot be built: {exc}") from None
    return array if writable else array.copy()


def decode(
    frame: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_table_bytes: int | None = None,
    max_items: int | None = None,
) -> Envelope:
    """Parse and validate one frame. Arrays are views of a bytearray or mmap frame, copies
    otherwise. A table may take at most `max_table_bytes` (default `max_bytes`) decoded.
    `max_items` bounds the JSON values of the header (counted from its commas, brackets and
    braces before parsing: `[{},{},...]` costs ~25 bytes of memory per byte sent)."""
    view = memoryview(frame).cast("B")
    if view.nbytes > max_bytes:
        raise MessageError(f"message of {view.nbytes} bytes is over the limit of {max_bytes}")
    if view.nbytes < _PREFIX.size:
        raise MessageError(f"message of {view.nbytes} bytes is too short to be a flame frame")
    magic, version, header_length = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise MessageError("not a flame frame (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise MessageError(f"frame format version {version} is not supported ({FORMAT_VERSION} is)")
    body_start = _PREFIX.size + header_length
    if body_start > view.nbytes:
        raise MessageError("frame header length points past the end of the message")
    text = bytes(view[_PREFIX.size : body_start])
    if max_items is not None:
        items = text.count(b",") + text.count(b"{") + text.count(b"[")
        if items > max_items:
            raise MessageError(
                f"message body has about {items} values, over the limit of {max_items}; "
                "send large numeric data as numpy arrays (they travel as raw bytes)"
            )
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raise MessageError("frame header is invalid: invalid JSON") from None
    try:
        header = _parse_header(raw)
    except ValueError as exc:
        raise MessageError(f"frame header is invalid: {exc}") from None
    payload = view[body_start:]
    blobs: list[memoryview] = []
    expected = 0
    for entry in header.blobs:
        if len(entry) != 2:
            raise MessageError("frame blob table entries must be [offset, length]")
        offset, length = entry
        if offset != expected or length < 0 or offset + length > payload.nbytes:
            raise MessageError("frame blob table does not match the payload")
        blobs.append(payload[offset : offset + length])
        expected = offset + length
    if expected != payload.nbytes:
        raise MessageError(f"frame has {payload.nbytes - expected} trailing bytes")
    writable = isinstance(frame, (bytearray, mmap.mmap)) or (  # arrays are views of it
        isinstance(frame, memoryview) and not frame.readonly
    )
    try:
        limit = max_bytes if max_table_bytes is None else max_table_bytes
        body = _decode_value(header.body, blobs, writable, limit)
    except RecursionError:
        raise MessageError("body nests too deeply") from None
    return Envelope(
        analysis=header.analysis,
        sender=header.sender,
        recipient=header.recipient,
        kind=header.kind,
        epoch=header.epoch,
        body=body,
        category=header.category,
        id=header.id,
        sent=header.sent,
        wire_bytes=view.nbytes,
    )


def pack(value: Any) -> bytes:
    """A value (JSON-like, arrays, bytes) as bytes, for storage: the wire format, no pickle."""
    return encode(Envelope("stored", "flame", "flame", "status", -1, value))


def unpack(data: bytes | bytearray, *, max_bytes: int = 1 << 40) -> Any:
    """The value `pack` stored; MessageError if the bytes are not such a value."""
    return decode(data, max_bytes=max_bytes).body


def to_jsonable(value: Any) -> Any:
    """Plain JSON data for output files: arrays become (nested) lists, bytes become hex."""
    kind = type(value)  # exact built-in types first: every status goes through here, twice
    if kind in _SCALARS:  # signed, and the ABC checks below cost ~10 µs per value
        return value
    if kind is dict:
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, Sealed):
        return {"sealed": value.scheme, "bytes": len(value.data)}
    if wire_tables.is_table(value):
        return wire_tables.to_columns(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [to_jsonable(v) for v in value]
    return value

"""Tables and non-string dict keys on the wire: Arrow IPC inside flame's envelope, no pickle.

`messages` calls in here for the payload values JSON cannot carry:

* pandas DataFrame / Series, pyarrow Table / RecordBatch, polars DataFrame / Series travel as
  one Arrow IPC stream blob, `{"$arrow": i, "type": "pandas.DataFrame", ...}`, and arrive as
  the same type (pandas index, nullable and categorical dtypes come back through the pandas
  metadata Arrow keeps in the schema). A receiver without pandas/polars gets a
  `pyarrow.Table` and a warning.
* dicts with int (or float, bool, None) keys, such as `value_counts().to_dict()`, travel as
  `{"$kd": [[key, value], ...]}` and arrive with the same keys.

Decoding validates the Arrow data fully (`validate(full=True)`) and raises `MessageError`.
Arrow's pickle-based Python extension type is never loaded (pyarrow >= 14.0.1). Batches
with compressed buffers are refused before anything is decompressed (a decompression bomb).
A decoded table must also fit the frame's size limit once materialized: Arrow arrays whose
length is not backed by bytes in the frame (null columns, empty structs, dictionaries whose
indices all point at one huge value) would otherwise inflate a few hundred bytes into GiBs
when turned into pandas, polars or Python lists; view and run-end-encoded types, which flame
never sends and which can reference the same bytes any number of times, are refused.
"""

from __future__ import annotations

import datetime
import decimal
import importlib
import logging
import math
import struct
from typing import TYPE_CHECKING, Any

from flame.errors import MessageError

if TYPE_CHECKING:
    import pyarrow as pa

# pyarrow, pandas and polars are imported only when a table is actually sent or received,
# so a process that never handles tables does not pay for importing them.

__all__ = ["KEY_TYPES", "decode_table", "dict_key", "encode_table", "is_table", "to_columns"]

log = logging.getLogger(__name__)

KEY_TYPES = (str, int, float, bool, type(None))
_TYPES = frozenset(
    {
        "arrow.Table",
        "arrow.RecordBatch",
        "pandas.DataFrame",
        "pandas.Series",
        "polars.DataFrame",
        "polars.Series",
    }
)
_SERIES_COLUMN = "__flame_series__"


def _kind(obj: Any) -> str | None:
    package = type(obj).__module__.split(".", 1)[0]
    name = type(obj).__name__
    if package == "pyarrow" and name in ("Table", "RecordBatch"):
        return f"arrow.{name}"
    if package in ("pandas", "polars") and name in ("DataFrame", "Series"):
        return f"{package}.{name}"
    return None


def is_table(obj: Any) -> bool:
    """Whether `obj` is one of the table types that travel as Arrow IPC."""
    return _kind(obj) is not None


def _as_arrow(obj: Any, kind: str, path: str) -> tuple[pa.Table, dict[str, Any]]:
    import pyarrow as pa

    extra: dict[str, Any] = {}
    if kind == "arrow.Table":
        return obj, extra
    if kind == "arrow.RecordBatch":
        return pa.Table.from_batches([obj]), extra
    if kind.endswith(".Series"):
        name = obj.name
        if isinstance(name, (float, int)) and not isinstance(name, bool):
            name = name.item() if hasattr(name, "item") else name
        if not isinstance(name, KEY_TYPES):
            raise TypeError(f"{path}: a Series named by a {type(name).__name__} cannot be sent")
        extra["name"] = name
        frame = (
            obj.to_frame(name=_SERIES_COLUMN)
            if kind == "pandas.Series"
            else obj.rename(_SERIES_COLUMN).to_frame()
        )
    else:
        frame = obj
    if kind.startswith("polars.") and any(_opaque(t) for t in frame.schema.values()):
        raise TypeError(_unconvertible(frame, kind, path, polars_objects=True))
    try:
        if kind.startswith("pandas."):
            return pa.Table.from_pandas(frame), extra
        return frame.to_arrow(), extra
    except Exception:  # their words quote the cell (repr of the value): never passed on
        raise TypeError(_unconvertible(frame, kind, path)) from None


def _opaque(dtype: Any) -> bool:
    """A polars Object dtype (also nested): Arrow gets the objects' addresses, not them."""
    if type(dtype).__name__ == "Object":
        return True
    inner = getattr(dtype, "inner", None)
    fields = getattr(dtype, "fields", None) or []
    return (inner is not None and _opaque(inner)) or any(_opaque(f.dtype) for f in fields)


def _unconvertible(frame: Any, kind: str, path: str, *, polars_objects: bool = False) -> str:
    """Why a table cannot become Arrow, naming its column and the types of the values in it,
    never a value: the converters' own messages quote the cell they failed on."""
    import pyarrow as pa

    for name in list(getattr(frame, "columns", [])):
        try:
            column = frame[name]
            if polars_objects:
                if _opaque(column.dtype):
                    raise TypeError("an Object column")
            elif kind.startswith("pandas."):
                pa.Array.from_pandas(column)
            else:
                column.to_arrow()
        except Exception:
            if isinstance(name, str):
                label = "(the values)" if name == _SERIES_COLUMN else repr(name[:64])
            else:
                label = f"named by a {type(name).__name__}"
            try:
                types = sorted({type(v).__name__ for v in list(column.head(10_000))})
            except Exception:
                types = ["?"]
            return (
                f"{path}: this {kind} cannot be sent as Arrow: column {label} holds values of "
                f"type {', '.join(types[:5])}; tables may hold numbers, strings, booleans, dates "
                "(flame.dp markers belong in a plain dict or list, not in a table cell)"
            )
    return f"{path}: this {kind} cannot be sent as Arrow (its index or column names cannot be)"


def encode_table(obj: Any, path: str) -> tuple[dict[str, Any], pa.Buffer] | None:
    """`(reference fields, IPC bytes)` for a table value, None for anything else."""
    import pyarrow as pa

    kind = _kind(obj)
    if kind is None:
        return None
    table, extra = _as_arrow(obj, kind, path)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return {"type": kind, **extra}, sink.getvalue()


def _field(meta: bytes, table: int, index: int) -> int | None:
    """Position of field `index` of the flatbuffer table at `table` (None when absent)."""
    vtable = table - struct.unpack_from("<i", meta, table)[0]
    slot = 4 + 2 * index
    if slot + 2 > struct.unpack_from("<H", meta, vtable)[0]:
        return None
    offset = struct.unpack_from("<H", meta, vtable + slot)[0]
    return None if offset == 0 else table + offset


def _target(meta: bytes, position: int) -> int:
    return position + int(struct.unpack_from("<I", meta, position)[0])


def _refuse_compression(data: memoryview) -> None:
    """MessageError if a batch of the stream has compressed buffers. flame never sends them,
    and they are a decompression bomb: 2 KB of zstd in a result decode to 64 MiB, 1 MiB to
    tens of GiB, allocated before anything could check the size."""
    import pyarrow as pa

    for message in pa.ipc.MessageReader.open_stream(pa.py_buffer(data)):
        meta = message.metadata.to_pybytes()  # flatbuffer Message, verified by Arrow
        try:
            root = _target(meta, 0)
            kind_at, header_at = _field(meta, root, 1), _field(meta, root, 2)
            kind = meta[kind_at] if kind_at is not None else 0
            if kind not in (2, 3) or header_at is None:  # DictionaryBatch, RecordBatch
                continue
            batch = _target(meta, header_at)
            if kind == 2:
                data_at = _field(meta, batch, 1)
                if data_at is None:
                    continue
                batch = _target(meta, data_at)
            compressed = _field(meta, batch, 3) is not None
        except (struct.error, IndexError):
            raise MessageError("Arrow payload has malformed batch metadata") from None
        if compressed:
            raise MessageError("Arrow payload has compressed buffers, which flame never sends")


_REFUSED_TYPES = ("string_view", "binary_view", "list_view", "large_list_view", "run_end_encoded")


def _width(arrow_type: pa.DataType) -> int:
    """Bytes one element takes once materialized: its own width for numbers, a pointer (8)
    for anything that becomes a Python or nested object."""
    try:
        bits = int(arrow_type.bit_width)
    except ValueError:  # not a fixed-width type
        return 8
    return max(1, bits // 8)


def _is_bytes(arrow_type: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(
        pa.types.is_string(arrow_type)
        or pa.types.is_binary(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or pa.types.is_large_binary(arrow_type)
    )


def _decoded_size(array: pa.Array, path: str) -> int:
    """An estimate (a lower bound, not an allocation) of the bytes `array` takes when pandas,
    polars or `to_pylist` materialize it, counting every nested element and expanding
    dictionaries, whose indices may all reference one big value."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lists = (
        pa.types.is_map,
        pa.types.is_list,
        pa.types.is_large_list,
        pa.types.is_fixed_size_list,
    )
    kind = array.type
    if any(str(kind).startswith(name) for name in _REFUSED_TYPES):
        raise MessageError(f"{path}: Arrow type {str(kind)[:40]} is not accepted on the wire")
    size = len(array) * _width(kind)
    if pa.types.is_dictionary(kind):
        dictionary = array.dictionary
        size += _decoded_size(dictionary, path)
        if len(dictionary) and len(array):
            if _is_bytes(kind.value_type):
                largest = pc.max(pc.binary_length(dictionary)).as_py() or 0
            else:
                largest = _decoded_size(dictionary, path)
            size += len(array) * largest
        return size
    if _is_bytes(kind):
        buffers = array.buffers()
        return size + (buffers[2].size if len(buffers) > 2 and buffers[2] is not None else 0)
    if pa.types.is_struct(kind) or pa.types.is_union(kind):
        children = [array.field(i) for i in range(kind.num_fields)]
    elif any(test(kind) for test in lists):
        children = [array.values]
    else:
        children = []
    return size + sum(_decoded_size(child, path) for child in children)


def _check_decoded_size(table: pa.Table, limit: int) -> None:
    total = 0
    for name, column in zip(table.column_names, table.columns, strict=True):
        for chunk in column.chunks:
            total += _decoded_size(chunk, f"column {str(name)[:60]!r}")
            if total > limit:
                raise MessageError(
                    f"Arrow table decodes to more than the message limit of {limit} bytes "
                    f"(at column {str(name)[:60]!r}, {table.num_rows} rows)"
                )


def _read(data: memoryview, limit: int) -> pa.Table:
    import pyarrow as pa

    try:
        _refuse_compression(data)
        with pa.ipc.open_stream(pa.py_buffer(data)) as reader:
            table = reader.read_all()
        table.validate(full=True)
        _check_decoded_size(table, limit)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise MessageError(f"Arrow payload is invalid: {str(exc)[:200]}") from None
    return table


def decode_table(ref: dict[str, Any], data: memoryview, limit: int = 1 << 40) -> Any:
    """The value `encode_table` sent, as the same type where this process can make it.
    MessageError if it would take more than `limit` bytes once materialized."""
    import pyarrow as pa

    kind = ref.get("type")
    allowed = {"$arrow", "type", "name"} if str(kind).endswith(".Series") else {"$arrow", "type"}
    if kind not in _TYPES or not set(ref) <= allowed or "type" not in ref:
        raise MessageError(f"Arrow reference has an unknown type or fields ({str(kind)[:40]!r})")
    name = ref.get("name")
    if not isinstance(name, KEY_TYPES):
        raise MessageError("Series name must be a JSON scalar")
    table = _read(data, limit)
    if kind == "arrow.Table":
        return table
    if kind == "arrow.RecordBatch":
        combined = table.combine_chunks()
        batches = combined.to_batches()
        return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)
    package = kind.split(".", 1)[0]
    try:
        module = importlib.import_module(package)
    except ImportError:
        log.warning("received a %s but %s is not installed; passing a pyarrow.Table", kind, package)
        return table
    try:
        frame = table.to_pandas() if package == "pandas" else module.from_arrow(table)
    except Exception as exc:  # the schema's metadata is sender-controlled
        raise MessageError(f"{kind} cannot be rebuilt: {type(exc).__name__}") from None
    if kind.endswith(".Series"):
        if frame.columns[0] != _SERIES_COLUMN or len(frame.columns) != 1:
            raise MessageError("a Series payload must hold exactly its one column")
        series = frame[_SERIES_COLUMN] if package == "pandas" else frame.to_series()
        return series.rename(name) if package == "pandas" else series.alias(str(name or ""))
    return frame


def dict_key(key: Any, path: str) -> Any:
    """A dict key as JSON (int, float, bool, None or str); TypeError for anything else."""
    if hasattr(key, "item") and not isinstance(key, (str, bytes)):  # numpy scalars
        key = key.item()
    if not isinstance(key, KEY_TYPES):  # its type, never its text (a key may be a value)
        raise TypeError(
            f"{path}: a dict key of type {type(key).__name__} cannot be sent; use str, int or "
            "float keys"
        )
    return key


def check_key(key: Any) -> Any:
    """A decoded dict key, validated."""
    if not isinstance(key, KEY_TYPES):
        raise MessageError("dict keys must be JSON scalars")
    return key


def to_columns(obj: Any) -> dict[str, list[Any]]:
    """A table as `{column: [values]}` of JSON-ready values (for output files)."""
    import pyarrow as pa

    kind = _kind(obj)
    if kind is None:
        raise TypeError(f"{type(obj).__name__} is not a table")
    table, extra = _as_arrow(obj, kind, "value")
    if kind == "pandas.DataFrame" or kind == "pandas.Series":
        frame = obj if kind == "pandas.DataFrame" else obj.to_frame(name=_SERIES_COLUMN)
        # The index is data (diagnosis labels, value_counts' values): its columns come
        # first; only pandas' default 0..n-1 index, which says nothing, is left out.
        frame = frame.reset_index(drop=_default_index(frame.index))
        try:
            table = pa.Table.from_pandas(frame, preserve_index=False)
        except Exception:  # pyarrow's words quote the value it failed on
            raise TypeError(_unconvertible(frame, kind, "value")) from None
    columns = table.to_pydict()
    if kind.endswith(".Series"):
        name = str(extra.get("name"))
        if name in columns:  # the index is named like the Series: the values get "value"
            name = "value"
        return {
            (name if k == _SERIES_COLUMN else str(k)): [_plain(v) for v in values]
            for k, values in columns.items()
        }
    return {str(k): [_plain(v) for v in values] for k, values in columns.items()}


def _default_index(index: Any) -> bool:
    """pandas' unnamed RangeIndex 0, 1, ..., n-1 (what `reset_index(drop=True)` gives)."""
    import pandas as pd

    return (
        isinstance(index, pd.RangeIndex)
        and index.name is None
        and index.start == 0
        and index.step == 1
    )


def _plain(value: Any) -> Any:
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value

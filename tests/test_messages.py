"""The wire envelope: round trips, refusals on encode, validation on decode, fuzzing."""

from __future__ import annotations

import contextlib
import json
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flame.errors import MessageError
from flame.wire.envelope import (
    FORMAT_VERSION,
    MAGIC,
    Envelope,
    Sealed,
    decode,
    encode,
    encode_parts,
    pack,
    unpack,
)

PREFIX = struct.Struct(">3sBI")

ALLOWED_DTYPES = [
    "?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16",
]  # fmt: skip


def envelope(body: object = None, **changes: object) -> Envelope:
    fields: dict[str, object] = {
        "analysis": "study-1",
        "sender": "node_a",
        "recipient": "aggregator",
        "kind": "result",
        "epoch": 3,
        "body": body,
    }
    fields.update(changes)
    return Envelope(**fields)  # type: ignore[arg-type]


def roundtrip(body: object, *, as_bytearray: bool = False) -> object:
    frame = encode(envelope(body))
    return decode(bytearray(frame) if as_bytearray else frame).body


def split(frame: bytes) -> tuple[dict, bytes]:
    """The header (as a dict) and the blob payload of a frame."""
    magic, version, length = PREFIX.unpack_from(frame)
    assert magic == MAGIC and version == FORMAT_VERSION
    header = json.loads(frame[PREFIX.size : PREFIX.size + length])
    return header, frame[PREFIX.size + length :]


def join(header: object, payload: bytes = b"", *, version: int = FORMAT_VERSION) -> bytes:
    raw = json.dumps(header).encode()
    return PREFIX.pack(MAGIC, version, len(raw)) + raw + payload


def assert_same(actual: object, expected: object) -> None:
    """Deep equality that also checks numpy dtype (incl. byte order) and shape."""
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray)
        assert actual.dtype == expected.dtype
        assert actual.dtype.str == expected.dtype.str  # byte order included
        assert actual.shape == expected.shape
        assert np.array_equal(actual, expected, equal_nan=expected.dtype.kind in "fc")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected)
        for key in expected:
            assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, list) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e)
    elif isinstance(expected, float) and math.isnan(expected):
        assert isinstance(actual, float) and math.isnan(actual)
    else:
        assert type(actual) is type(expected) or isinstance(expected, (bytearray, memoryview))
        assert actual == expected


# --- round trips -----------------------------------------------------------------------------


def test_envelope_fields_round_trip() -> None:
    original = envelope({"x": 1}, category="gossip", epoch=-1, kind="message")
    decoded = decode(encode(original))
    assert decoded == original  # dataclass equality over every field


@pytest.mark.parametrize(
    "body",
    [
        None,
        True,
        False,
        0,
        -(2**70),
        3.25,
        float("inf"),
        -float("inf"),
        "",
        "ünïcødé ✓ \u0000 \n",
        [],
        {},
        [1, [2, [3, {"a": None}]]],
        {"nested": {"list": [1.5, "x", None, {"deep": [True]}]}},
    ],
)
def test_json_values_round_trip(body: object) -> None:
    assert_same(roundtrip(body), body)


def test_nan_round_trips() -> None:
    decoded = roundtrip({"v": float("nan")})
    assert isinstance(decoded, dict) and math.isnan(decoded["v"])


def test_tuples_become_lists() -> None:
    assert roundtrip((1, (2, 3))) == [1, [2, 3]]


def test_numpy_scalars_become_python_numbers() -> None:
    decoded = roundtrip({"i": np.int16(-7), "f": np.float32(0.5), "b": np.bool_(True)})
    assert decoded == {"i": -7, "f": 0.5, "b": True}
    assert type(decoded["i"]) is int and type(decoded["b"]) is bool  # type: ignore[index]


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
@pytest.mark.parametrize("order", ["<", ">"])
def test_arrays_of_every_allowed_dtype(dtype: str, order: str) -> None:
    rng = np.random.default_rng(sum(map(ord, dtype + order)))
    base = rng.normal(size=(3, 4)) * 100
    if dtype.startswith("c"):
        base = base + 1j * rng.normal(size=(3, 4))
    array = base.astype(np.dtype(dtype).newbyteorder(order))
    body = {"a": array, "list": [array[0], {"inner": array.T}]}
    assert_same(roundtrip(body), {"a": array, "list": [array[0], {"inner": array.T.copy()}]})


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
def test_empty_arrays(dtype: str) -> None:
    for shape in [(0,), (3, 0), (0, 0, 2)]:
        array = np.zeros(shape, dtype=dtype)
        assert_same(roundtrip(array), array)


@pytest.mark.parametrize("dtype", ["f8", ">i4", "c16", "?"])
def test_zero_dimensional_arrays_keep_their_shape(dtype: str) -> None:
    array = np.array(5, dtype=dtype)
    decoded = roundtrip({"scalar": array})
    assert isinstance(decoded, dict)
    assert_same(decoded["scalar"], array)


def test_non_contiguous_arrays() -> None:
    base = np.arange(60, dtype=np.float64).reshape(3, 4, 5)
    views = {
        "strided": base[:, ::2, 1::2],
        "transposed": base.T,
        "reversed": base[::-1, :, ::-1],
        "fortran": np.asfortranarray(base),
        "column": base[:, 1, 2],
    }
    decoded = roundtrip(views)
    assert isinstance(decoded, dict)
    for name, view in views.items():
        assert not view.flags.c_contiguous or name == "fortran" or name == "column"
        assert_same(decoded[name], np.array(view))


def test_big_endian_array_values_survive() -> None:
    values = np.array([1.5, -2.25, 1e300], dtype=">f8")
    decoded = roundtrip(values)
    assert isinstance(decoded, np.ndarray)
    assert decoded.dtype.str == ">f8"
    assert decoded.tolist() == [1.5, -2.25, 1e300]


def test_bytes_round_trip() -> None:
    payload = bytes(range(256)) * 3
    decoded = roundtrip(
        {"b": payload, "ba": bytearray(b"xyz"), "mv": memoryview(b"12345")[1:4], "e": b""}
    )
    assert decoded == {"b": payload, "ba": b"xyz", "mv": b"234", "e": b""}
    assert all(type(v) is bytes for v in decoded.values())  # type: ignore[union-attr]


def test_dollar_prefixed_user_keys() -> None:
    body = {
        "$nd": 1,
        "$b": [2],
        "$": "dollar",
        "$$x": {"$$$y": 4, "dtype": "<f8", "shape": [1]},
        "plain": {"$nd": 0, "dtype": "<f8", "shape": [1]},
    }
    assert roundtrip(body) == body


def test_dollar_keys_next_to_real_arrays() -> None:
    array = np.arange(4, dtype=np.int32)
    body = {"$nd": array, "x": {"$b": b"raw"}}
    decoded = roundtrip(body)
    assert isinstance(decoded, dict)
    assert_same(decoded["$nd"], array)
    assert decoded["x"] == {"$b": b"raw"}


def test_sealed_payloads_round_trip() -> None:
    sealed = Sealed("paillier", bytes(range(200)))
    body = {"s": sealed, "$sealed": "user key", "list": [Sealed("x", b"")]}
    assert roundtrip(body) == body


@pytest.mark.parametrize(
    "reference",
    [
        {"$sealed": 0},
        {"$sealed": 0, "scheme": 5},
        {"$sealed": 0, "scheme": "s" * 33},
        {"$sealed": 0, "scheme": "p", "extra": 1},
        {"$sealed": 9, "scheme": "p"},
    ],
)
def test_bad_sealed_references(reference: dict) -> None:
    header, payload = split(encode(envelope({"s": Sealed("p", b"abc")})))
    header["body"]["s"] = reference
    with pytest.raises(MessageError):
        decode(join(header, payload))


def test_pack_and_unpack_values() -> None:
    value = {"a": np.arange(5, dtype=">u2"), "b": [b"x", 1.5, None], "$c": "d"}
    assert_same(unpack(pack(value)), value)
    with pytest.raises(MessageError):
        unpack(b"not packed")


def test_arrays_from_bytearray_are_writable_views() -> None:
    array = np.arange(10, dtype=np.float64)
    frame = bytearray(encode(envelope({"a": array})))
    decoded = decode(frame).body
    assert decoded["a"].flags.writeable
    decoded["a"][0] = 42.0
    assert decoded["a"][0] == 42.0


def test_arrays_from_bytes_are_independent_copies() -> None:
    array = np.arange(10, dtype=np.int64)
    frame = encode(envelope([array]))
    decoded = decode(frame).body
    decoded[0][3] = -1  # must not fail (bytes are immutable, so it is a copy)
    assert decode(frame).body[0][3] == 3


def test_encode_parts_joins_to_encode() -> None:
    env = envelope({"a": np.ones((2, 2)), "b": b"xy"})
    assert b"".join(bytes(p) for p in encode_parts(env)) == encode(env)


def test_blobs_are_raw_bytes_of_the_array() -> None:
    array = np.arange(6, dtype=">i2").reshape(2, 3)
    header, payload = split(encode(envelope({"a": array})))
    ref = header["body"]["a"]
    assert ref["dtype"] == ">i2" and ref["shape"] == [2, 3]
    start, length = header["blobs"][ref["$nd"]]
    assert payload[start : start + length] == array.tobytes()


def test_frame_is_prefix_json_header_and_raw_blobs() -> None:
    array = np.arange(3, dtype="<i8")
    frame = encode(envelope({"a": array, "s": "text"}))
    header, payload = split(frame)  # asserts magic and version, parses the header as JSON
    assert header["body"]["s"] == "text"
    assert payload == array.tobytes()  # nothing but the raw array bytes after the header


# --- refusals when encoding ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"a": {"b": {(1, 2): 3}}}, "body.a.b"),
        ({"a": [0, {b"k": 1}]}, "body.a[1]"),
        ({"s": {1, 2}}, "body.s"),
        ([0, frozenset()], "body[1]"),
        ({"o": np.array([object(), 1], dtype=object)}, "body.o"),
        ({"u": np.array(["text"])}, "body.u"),
        ({"dt": np.array(["2020-01-01"], dtype="datetime64[D]")}, "body.dt"),
        ({"rec": np.zeros(2, dtype=[("x", "f8")])}, "body.rec"),
        ({"fn": print}, "body.fn"),
        ({"obj": object()}, "body.obj"),
    ],
)
def test_unsendable_values_raise_type_error_naming_the_path(body: object, path: str) -> None:
    with pytest.raises(TypeError) as caught:
        encode(envelope(body))
    message = str(caught.value)
    assert message.startswith(path + ":") or f"{path}:" in message, message


def test_masked_arrays_are_not_sent_without_their_mask() -> None:
    masked = np.ma.masked_array([1.0, 99.0, 3.0], mask=[False, True, False])
    with pytest.raises(TypeError, match=r"body\.m"):
        encode(envelope({"m": masked}))


def test_encode_refuses_what_decode_would_drop() -> None:
    deep: list = []
    level = deep
    for _ in range(250):
        level.append([])
        level = level[0]
    with pytest.raises((TypeError, ValueError)):
        encode(envelope(deep))


def test_long_double_is_refused() -> None:
    if np.dtype(np.longdouble).itemsize == 8:
        pytest.skip("long double is plain double here")
    with pytest.raises(TypeError, match=r"body\.x"):
        encode(envelope({"x": np.zeros(2, dtype=np.longdouble)}))


# --- validation when decoding ----------------------------------------------------------------


@pytest.fixture
def valid_frame() -> bytes:
    return encode(
        envelope({"a": np.arange(6, dtype="<f8").reshape(2, 3), "b": b"bytes", "n": [1, "x"]})
    )


def test_valid_frame_decodes(valid_frame: bytes) -> None:
    assert decode(valid_frame).body["b"] == b"bytes"


@pytest.mark.parametrize("keep", [0, 1, 3, 7, 8, 20])
def test_truncated_prefix_or_header(valid_frame: bytes, keep: int) -> None:
    with pytest.raises(MessageError):
        decode(valid_frame[:keep])


def test_truncated_payload(valid_frame: bytes) -> None:
    for cut in (1, 5, 48):
        with pytest.raises(MessageError):
            decode(valid_frame[:-cut])


def test_trailing_bytes(valid_frame: bytes) -> None:
    with pytest.raises(MessageError, match="trailing"):
        decode(valid_frame + b"\0")


def test_bad_magic(valid_frame: bytes) -> None:
    with pytest.raises(MessageError, match="magic"):
        decode(b"XLM" + valid_frame[3:])


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, 255])
def test_wrong_version(valid_frame: bytes, version: int) -> None:
    frame = valid_frame[:3] + bytes([version]) + valid_frame[4:]
    with pytest.raises(MessageError, match="version"):
        decode(frame)


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"not json", b"\xff\xfe{}", b"[" * 100_000, b"null", b"[1,2]", b'"text"'],
)
def test_header_garbage(raw: bytes) -> None:
    frame = PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw)) + raw
    with pytest.raises(MessageError):
        decode(frame)


def test_header_length_past_end(valid_frame: bytes) -> None:
    _, _, length = PREFIX.unpack_from(valid_frame)
    frame = PREFIX.pack(MAGIC, FORMAT_VERSION, len(valid_frame) + 10) + valid_frame[PREFIX.size :]
    assert length < len(valid_frame)
    with pytest.raises(MessageError):
        decode(frame)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", 5),
        ("id", "NOT-HEX!"),
        ("id", ""),
        ("analysis", None),
        ("analysis", "has space"),
        ("analysis", "x" * 129),
        ("sender", 1),
        ("sender", "../etc"),
        ("recipient", ["a"]),
        ("kind", "bogus"),
        ("kind", 3),
        ("epoch", "3"),
        ("epoch", 1.5),
        ("epoch", True),
        ("epoch", -2),
        ("epoch", 10**12),
        ("sent", "yesterday"),
        ("category", 7),
        ("category", "c" * 300),
        ("blobs", "nope"),
        ("blobs", [["0", 5]]),
        ("blobs", [[0, 5, 1]]),
        ("blobs", [0]),
        ("extra_field", 1),
    ],
)
def test_header_fields_of_wrong_type(valid_frame: bytes, field: str, value: object) -> None:
    header, payload = split(valid_frame)
    header[field] = value
    with pytest.raises(MessageError):
        decode(join(header, payload))


@pytest.mark.parametrize("missing", ["id", "analysis", "sender", "recipient", "kind", "epoch"])
def test_header_missing_fields(valid_frame: bytes, missing: str) -> None:
    header, payload = split(valid_frame)
    del header[missing]
    with pytest.raises(MessageError):
        decode(join(header, payload))


@pytest.mark.parametrize(
    "blobs",
    [
        [],  # payload present but no table
        [[0, 48]],  # too few entries
        [[1, 48], [49, 5]],  # gap at the start
        [[0, 48], [47, 6]],  # overlap
        [[0, 48], [48, 6]],  # past the end
        [[0, -1], [0, 53]],
        [[0, 48], [48, 4]],  # trailing byte
    ],
)
def test_blob_table_mismatches(valid_frame: bytes, blobs: list) -> None:
    header, payload = split(valid_frame)
    assert header["blobs"] == [[0, 48], [48, 5]] and len(payload) == 53
    header["blobs"] = blobs
    with pytest.raises(MessageError):
        decode(join(header, payload))


@pytest.mark.parametrize(
    "reference",
    [
        {"$nd": 0, "dtype": "<f8", "shape": [2, 2]},  # 32 bytes, blob has 48
        {"$nd": 0, "dtype": "<f8", "shape": [7]},
        {"$nd": 0, "dtype": "<f4", "shape": [2, 3]},
        {"$nd": 1, "dtype": "<f8", "shape": [2, 3]},  # wrong blob
        {"$nd": 2, "dtype": "<f8", "shape": [6]},  # no such blob
        {"$nd": -1, "dtype": "<f8", "shape": [6]},
        {"$nd": True, "dtype": "<f8", "shape": [6]},
        {"$nd": "0", "dtype": "<f8", "shape": [6]},
        {"$nd": 0, "dtype": "<f8", "shape": [-6]},
        {"$nd": 0, "dtype": "<f8", "shape": 6},
        {"$nd": 0, "dtype": "<f8", "shape": [6.0]},
        {"$nd": 0, "dtype": "<f8", "shape": [True] * 6},
        {"$nd": 0, "dtype": "<f8", "shape": [1] * 33},
        {"$nd": 0, "dtype": "<f8"},
        {"$nd": 0, "dtype": "<f8", "shape": [6], "extra": 1},
    ],
)
def test_array_reference_mismatches(valid_frame: bytes, reference: dict) -> None:
    header, payload = split(valid_frame)
    header["body"]["a"] = reference
    with pytest.raises(MessageError):
        decode(join(header, payload))


@pytest.mark.parametrize(
    "dtype",
    ["|O", "O", "<U1", "|S8", "|V8", "<M8[D]", "<m8", "<f16", "<c32", "f8,f8", "", 8, None,
     "<f8 ", "float64", "int", "<i16", "<f1"],
)  # fmt: skip
def test_disallowed_dtype_strings(valid_frame: bytes, dtype: object) -> None:
    header, payload = split(valid_frame)
    header["body"]["a"] = {"$nd": 0, "dtype": dtype, "shape": [6]}
    with pytest.raises(MessageError):
        decode(join(header, payload))


@pytest.mark.parametrize(
    "body",
    [
        {"$x": 1},
        {"$ref": {"a": 1}},
        [{"$": 1}],
        {"$b": 0, "extra": 1},
        {"$b": 5},
        {"$b": "0"},
    ],
)
def test_unknown_dollar_keys_and_bad_byte_references(valid_frame: bytes, body: object) -> None:
    header, payload = split(valid_frame)
    header["body"] = body
    with pytest.raises(MessageError):
        decode(join(header, payload))


@pytest.mark.parametrize("shape", [[0, 10**30], [0, 2**62], [2**40, 2**40, 0]])
def test_zero_size_array_with_huge_dimensions(valid_frame: bytes, shape: list) -> None:
    header, _ = split(valid_frame)
    header["body"] = {"$nd": 0, "dtype": "<f8", "shape": shape}
    header["blobs"] = [[0, 0]]
    with pytest.raises(MessageError):
        decode(join(header, b""))


def test_deep_nesting_is_refused_not_a_crash() -> None:
    header, _ = split(encode(envelope("PLACEHOLDER")))
    template = json.dumps(header)
    for depth in (250, 5000, 100_000):
        raw = template.replace('"PLACEHOLDER"', "[" * depth + "]" * depth)
        frame = PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw)) + raw.encode()
        with pytest.raises(MessageError):
            decode(frame)


def test_oversize_frame(valid_frame: bytes) -> None:
    with pytest.raises(MessageError, match="limit"):
        decode(valid_frame, max_bytes=len(valid_frame) - 1)
    assert decode(valid_frame, max_bytes=len(valid_frame)).sender == "node_a"


def test_huge_integer_text_in_header() -> None:
    header, _ = split(encode(envelope(None)))
    raw = json.dumps(header).replace('"body": null', '"body": ' + "9" * 10_000)
    frame = PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw)) + raw.encode()
    with pytest.raises(MessageError):
        decode(frame)


# --- fuzzing ---------------------------------------------------------------------------------

_SAMPLE_FRAMES = [
    encode(envelope(None)),
    encode(envelope({"a": np.arange(6, dtype=">i4").reshape(2, 3), "b": b"\x00\x01", "$k": 1})),
    encode(envelope([np.zeros(0), np.ones((2, 2), dtype="c8"), {"x": [1.5, None, "s"]}])),
    encode(envelope({"e": np.zeros((0, 3), dtype="u2"), "f": np.array([True, False])})),
]

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["$nd", "$b", "$sealed", "scheme", "dtype", "shape", "$$x", "$y", ""])
            | st.text(max_size=4),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


def _decode_only_message_errors(frame: bytes | bytearray) -> None:
    with contextlib.suppress(MessageError):
        decode(frame, max_bytes=1 << 20)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_only_message_errors(data)
    _decode_only_message_errors(MAGIC + bytes([FORMAT_VERSION]) + data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_SAMPLE_FRAMES),
    st.lists(
        st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]), st.integers(0, 10**6),
                  st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
)  # fmt: skip
def test_fuzz_byte_mutations_of_valid_frames(
    frame: bytes, mutations: list[tuple[str, int, int]], as_bytearray: bool
) -> None:
    data = bytearray(frame)
    for op, position, byte in mutations:
        if not data:
            break
        i = position % len(data)
        if op == "flip":
            data[i] ^= byte or 1
        elif op == "insert":
            data.insert(i, byte)
        elif op == "delete":
            del data[i]
        else:
            del data[i:]
    _decode_only_message_errors(data if as_bytearray else bytes(data))


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_SAMPLE_FRAMES), st.data())
def test_fuzz_structured_header_mutations(frame: bytes, data: st.DataObject) -> None:
    """Replace any part of a valid header with random JSON, keeping the framing consistent."""
    header, payload = split(frame)
    paths = [p for p in _paths(header) if p]
    path = data.draw(st.sampled_from(paths))
    replacement = data.draw(_json | st.integers(min_value=0, max_value=2**64))
    target = header
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = replacement
    try:
        raw = json.dumps(header).encode()
    except ValueError:
        return
    cut = data.draw(st.integers(min_value=0, max_value=len(payload)))
    candidate = PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw)) + raw + payload[:cut]
    _decode_only_message_errors(candidate)

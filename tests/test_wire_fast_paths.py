"""The encoder takes exact built-in types before its numpy and ABC checks: dict subclasses,
other Mappings, non-str keys and numpy values must still go the way they always went."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest

from flame.wire.envelope import Envelope, Sealed, decode, encode


class _Frozen(Mapping[str, Any]):
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def _round_trip(body: Any) -> Any:
    return decode(encode(Envelope("a", "n", "m", "status", 0, body))).body


def test_every_kind_of_mapping_and_sequence_arrives_as_before() -> None:
    inner = {"$x": 1, "y": [1.5, None, True, "s"]}
    expected = {"$x": 1, "y": [1.5, None, True, "s"]}
    for mapping in (inner, OrderedDict(inner), MappingProxyType(inner), _Frozen(inner)):
        assert _round_trip({"m": mapping, "t": (1, 2)}) == {"m": expected, "t": [1, 2]}
    assert _round_trip({1: "a", 2.5: "b", "c": {None: 1}}) == {1: "a", 2.5: "b", "c": {None: 1}}
    assert _round_trip(OrderedDict({1: "a"})) == {1: "a"}
    got = _round_trip({"v": np.float32(1.5), "n": np.int64(3), "s": Sealed("k", b"\x00\x01")})
    assert got == {"v": 1.5, "n": 3, "s": Sealed("k", b"\x00\x01")}
    assert type(got["n"]) is int


def test_what_cannot_be_sent_is_still_refused_naming_its_path() -> None:
    with pytest.raises(TypeError, match=r"body\.a\[1\]: a set cannot be sent"):
        encode(Envelope("a", "n", "m", "status", 0, {"a": [1, {2}]}))
    with pytest.raises(TypeError, match="masked array"):
        encode(Envelope("a", "n", "m", "status", 0, {"a": np.ma.masked_array([1, 2])}))
    deep: Any = 1
    for _ in range(150):
        deep = [deep]
    with pytest.raises(TypeError, match="nests deeper"):
        encode(Envelope("a", "n", "m", "status", 0, deep))

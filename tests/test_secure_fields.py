"""Per-field encoding of secure values: `flame.secure(x, bound=..., precision=...)`.

A large-magnitude field runs with its own bound and no global setting; the out-of-bound
error says which bound was in force and how to raise it; each field's packing (and so its
wire size) follows its own spec; scalars come back as Python numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import flame
from flame.config import load_config
from flame.errors import FlameError, RunFailed
from flame.protocols.paillier import EncryptedVector, load_private_key, write_keypair
from flame.secure.fields import SecureKeys, seal
from flame.wire.envelope import Sealed

AGES = {  # 17 rows on node a, as in the report that led to per-field bounds
    "a": [23, 35, 41, 52, 67, 71, 80, 45, 38, 29, 60, 58, 77, 84, 19, 33, 49],
    "b": [55, 62, 70, 44],
    "c": [31, 90, 66],
}
NODES = {node: {"x.csv": "age\n" + "\n".join(map(str, ages)) + "\n"} for node, ages in AGES.items()}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_keypair(tmp_path_factory.mktemp("keys"), 2048)


def config(keys: tuple[Path, Path]) -> flame.FlameConfig:
    public, private = keys
    secure = {"enabled": True, "public_key_file": public, "private_key_file": private}
    return load_config(secure=secure, epoch_timeout=30, presence_timeout=30)


def squares(bound: float | None):
    def analyze(data):
        age = data.read_csv()["age"]
        return {
            "n": flame.secure(float(age.size)),
            "count": flame.secure(int(age.size), precision=0),
            "sum": flame.secure(age.sum()),
            "squares": flame.secure((age**2).sum(), bound=bound),
            "hist": flame.secure(np.histogram(age, bins=4, range=(0, 100))[0], precision=0),
        }

    return analyze


def aggregate(results):
    return {name: results.secure[name] for name in ("n", "count", "sum", "squares", "hist")}


def test_a_large_field_fails_at_the_default_bound_and_the_error_says_how_to_raise_it(
    keys,
) -> None:
    assert sum(a * a for a in AGES["a"]) > 32768  # the default bound
    with pytest.raises(RunFailed) as failed:
        flame.simulate(squares(None), aggregate, data=NODES, config=config(keys))
    message = str(failed.value)
    assert "'squares'" in message and "outside the declared bound" in message
    assert "+-32768" in message and "FLAME_SECURE__BOUND" in message
    assert "flame.secure(value, bound=...)" in message
    assert str(sum(a * a for a in AGES["a"])) not in message  # a node's value never leaks


def test_a_per_field_bound_runs_without_any_global_setting(keys) -> None:
    result = flame.simulate(squares(1e6), aggregate, data=NODES, config=config(keys))
    ages = np.concatenate([np.array(a, dtype=float) for a in AGES.values()])
    value = result.value
    assert type(value["n"]) is float and value["n"] == ages.size
    assert type(value["count"]) is int and value["count"] == ages.size
    assert type(value["squares"]) is float
    assert abs(value["squares"] - float((ages**2).sum())) <= 3 * 2.0**-17
    assert abs(value["sum"] - float(ages.sum())) <= 3 * 2.0**-17
    hist = value["hist"]
    assert isinstance(hist, np.ndarray) and hist.dtype == np.int64
    assert hist.tolist() == np.histogram(ages, bins=4, range=(0, 100))[0].tolist()


def test_the_error_names_a_per_field_bound_when_that_one_is_too_small(keys) -> None:
    with pytest.raises(RunFailed, match=r"bound in force for 'squares' is \+-1000 \(set by"):
        flame.simulate(squares(1000), aggregate, data=NODES, config=config(keys))


def test_each_field_is_packed_by_its_own_spec(keys) -> None:
    node_keys = SecureKeys.from_settings(config(keys).secure, role="analysis")
    values = np.ones(500)
    specs: dict[str, object] = {}
    sealed = seal(
        {
            "small": flame.secure(values, bound=1, precision=0),
            "default": flame.secure(values),
            "large": flame.secure(values, bound=1e12, precision=8),
        },
        node_keys,
        specs,
    )
    assert set(specs) == {"small", "default", "large"}
    public = load_private_key(keys[1]).public_key
    layouts = {
        name: EncryptedVector.from_bytes(item.data, public).layout
        for name, item in sealed.items()
        if isinstance(item, Sealed)
    }
    assert layouts["small"].precision == 0 and layouts["large"].precision == 8
    assert layouts["default"] == node_keys.spec.layout(public)  # untouched fields unchanged
    assert layouts["small"].slot_bytes < layouts["default"].slot_bytes
    assert layouts["default"].slot_bytes < layouts["large"].slot_bytes
    sizes = {name: len(item.data) for name, item in sealed.items()}
    assert sizes["small"] < sizes["default"] < sizes["large"]


def test_nodes_that_mark_a_field_differently_stop_the_run_with_a_hint(keys) -> None:
    def analyze(data):
        bound = 100.0 if data.node_id == "b" else None
        return {"x": flame.secure(1.0, bound=bound)}

    with pytest.raises(RunFailed, match=r"cannot add the encrypted 'x'.*same flame.secure"):
        flame.simulate(analyze, aggregate, data=NODES, config=config(keys))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bound": -1.0}, "bound must be a positive number"),
        ({"bound": float("nan")}, "bound must be a positive number"),
        ({"bound": "big"}, "bound must be a positive number"),
        ({"precision": 61}, "int from 0 to 60"),
        ({"precision": 1.5}, "int from 0 to 60"),
    ],
)
def test_bad_marks_are_refused_where_they_are_made(kwargs, match) -> None:
    with pytest.raises(FlameError, match=match):
        flame.secure(1.0, **kwargs)


def test_a_spec_past_the_encoding_limit_names_the_field(keys) -> None:
    node_keys = SecureKeys.from_settings(config(keys).secure, role="analysis")
    with pytest.raises(FlameError, match=r"at 'huge'.*2\*\*62"):
        seal({"huge": flame.secure(1.0, bound=1e18, precision=40)}, node_keys)

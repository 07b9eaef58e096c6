"""`flame.load_result`: results of earlier runs and epochs read back by analysis id."""

from __future__ import annotations

import pytest

import flame
from flame.config import load_config

NODES = {"a": {"x.csv": "v\n1\n2\n"}, "b": {"x.csv": "v\n5\n"}}


def analyze(data, epoch, previous):
    return float(data.read_csv()["v"].sum()) + epoch


def aggregate(results, epoch, previous):
    return {"epoch": epoch, "total": sum(results.values())}


def test_final_and_epoch_results_read_back(tmp_path) -> None:
    config = load_config(analysis_id="old-run", epochs=3, storage={"results_dir": tmp_path})
    result = flame.simulate(analyze, aggregate, data=NODES, config=config)
    assert flame.load_result("old-run", config=config) == result.value
    assert flame.load_result("old-run", epoch=0, config=config) == {"epoch": 0, "total": 8.0}
    assert flame.load_result("old-run", epoch=1, config=config) == {"epoch": 1, "total": 10.0}


def test_an_earlier_run_warm_starts_a_new_one(tmp_path) -> None:
    config = load_config(analysis_id="first", epochs=1, storage={"results_dir": tmp_path})
    flame.simulate(analyze, aggregate, data=NODES, config=config)

    def warm(data, epoch, previous):
        earlier = flame.load_result("first", config=config)
        return earlier["total"]

    second = load_config(analysis_id="second", epochs=1, storage={"results_dir": tmp_path})
    result = flame.simulate(warm, aggregate, data=NODES, config=second)
    assert result.value == {"epoch": 0, "total": 16.0}


def test_missing_results_and_storage_are_clear_errors(tmp_path) -> None:
    config = load_config(storage={"results_dir": tmp_path})
    with pytest.raises(flame.FlameError, match="'nope' has no stored final result"):
        flame.load_result("nope", config=config)
    with pytest.raises(flame.FlameError, match="aggregate of epoch 4"):
        flame.load_result("nope", epoch=4, config=config)
    with pytest.raises(flame.ConfigError, match="FLAME_STORAGE__ENDPOINT"):
        flame.load_result("nope", config=load_config())

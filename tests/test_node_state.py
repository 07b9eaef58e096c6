"""Node-local state: what analyze saves stays on the node, survives a restart, and is never
sent anywhere."""

from __future__ import annotations

import numpy as np

import flame
from flame.clients.file_store import FileStore
from flame.clients.object_store import AnalysisLayout
from flame.config import load_config
from flame.testing import MemoryBroker
from flame.wire.envelope import unpack

NODES = {"a": {"x.csv": "v\n1\n2\n"}, "b": {"x.csv": "v\n5\n"}}


def analyze(data, epoch, previous):
    ctx = flame.context()
    if epoch == 0 and ctx.load("model") is None:
        ctx.save("model", {"fitted": data.read_csv()["v"] * 10})
    model = ctx.load("model")
    return {"epoch": epoch, "total": float(model["fitted"].sum())}


def aggregate(results, epoch, previous):
    return {node: r["total"] for node, r in results.items()}


def test_state_saved_in_epoch_0_is_read_later_and_kept_on_disk(tmp_path) -> None:
    broker = MemoryBroker()
    broker.record = True
    config = load_config(analysis_id="state-test", epochs=3, storage={"results_dir": tmp_path})
    result = flame.simulate(analyze, aggregate, data=NODES, config=config, broker=broker)
    assert result.value == {"a": 30.0, "b": 50.0}
    store = FileStore(tmp_path)
    saved = unpack(store.get_bytes(AnalysisLayout("state-test").node_state("a", "model")))
    assert np.array_equal(saved["fitted"], [10.0, 20.0])
    # the state itself never travelled: no message carries the fitted array
    assert not any(isinstance(e.body, dict) and "fitted" in e.body for e in broker.delivered)


def test_state_survives_a_restart_of_the_run(tmp_path) -> None:
    config = load_config(analysis_id="state-test", epochs=1, storage={"results_dir": tmp_path})
    flame.simulate(analyze, aggregate, data=NODES, config=config)
    # as if the run had crashed before finishing: otherwise its stored result is announced
    FileStore(tmp_path).delete_prefix("state-test/final/")

    def analyze_after_restart(data, epoch, previous):
        model = flame.context().load("model")
        return {"total": float(model["fitted"].sum()) if model is not None else -1.0}

    again = flame.simulate(analyze_after_restart, aggregate, data=NODES, config=config)
    assert again.value == {"a": 30.0, "b": 50.0}


def test_without_storage_state_lives_in_memory_for_the_run() -> None:
    result = flame.simulate(analyze, aggregate, data=NODES, epochs=2)
    assert result.value == {"a": 30.0, "b": 50.0}

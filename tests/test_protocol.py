"""The star protocol: simulate(), Aggregator and AnalysisClient over the in-memory broker.

Timeouts are short on purpose; where a test checks that something fails *fast*, the
configured timeouts are long, so only a prompt failure (not a timeout) can pass it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import flame
from flame.aggregator.records import Checkpoint, EpochRecord, Event, RunResult
from flame.aggregator.server import Aggregator
from flame.analysis.functions import AnalysisFunctions
from flame.config import FlameConfig, load_config
from flame.data import Data, MemorySource
from flame.errors import FlameError, RunFailed, RunTimeout
from flame.node.runtime import AnalysisClient
from flame.transport.memory import MemoryBroker, MemoryTransport
from flame.wire.envelope import Envelope, encode

SECRET = "tok-8c1f5e9a77d2-very-secret"

# each node's numbers; unequal sizes on purpose
VALUES = {
    "alpha": [1.5, 2.0, 4.25],
    "beta": [10.0, -3.0],
    "gamma": [0.5, 0.25, 7.0, 8.0, -1.0],
}
NODES = sorted(VALUES)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("FLAME_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture(autouse=True)
def no_stray_threads() -> Iterator[None]:
    """Every simulated node thread has stopped when a run returns or raises."""
    yield
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        alive = [t.name for t in threading.enumerate() if t.name.startswith("flame-")]
        if not alive:
            return
        time.sleep(0.05)
    pytest.fail(f"node threads still running: {alive}")


def csv_of(values: list[float]) -> str:
    return "x\n" + "".join(f"{v!r}\n" for v in values)


def data_spec(values: dict[str, list[float]] = VALUES) -> dict[str, dict[str, str]]:
    return {node: {"values.csv": csv_of(v)} for node, v in values.items()}


def config(**changes: Any) -> FlameConfig:
    settings: dict[str, Any] = {"epoch_timeout": 5.0, "presence_timeout": 5.0}
    settings.update(changes)
    return load_config(**settings)


def node_sum(data: Data) -> float:
    return float(data.read_csv()["x"].sum())


def pooled_sum(values: dict[str, list[float]] = VALUES) -> float:
    return float(np.sum(np.concatenate([np.array(v) for v in values.values()])))


def sum_analyze(data: Data, epoch: int, previous: Any) -> dict[str, Any]:
    return {"sum": node_sum(data), "n": len(data.read_csv()["x"])}


def sum_aggregate(results: dict[str, Any], epoch: int, previous: Any) -> dict[str, Any]:
    return {
        "sum": sum(r["sum"] for r in results.values()),
        "n": sum(r["n"] for r in results.values()),
    }


class Recorder:
    """Thread-safe log of calls made by the analyst's functions."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[Any, ...]] = []

    def add(self, *item: Any) -> None:
        with self.lock:
            self.calls.append(item)

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return [c[1:] for c in self.calls if c[0] == kind]


# --- simulate: results, epochs, history ------------------------------------------------------


def test_one_epoch_equals_pooled_computation() -> None:
    events: list[Event] = []
    result = flame.simulate(
        sum_analyze, sum_aggregate, data=data_spec(), config=config(), on_event=events.append
    )
    assert isinstance(result, RunResult)
    assert result.value["sum"] == pytest.approx(pooled_sum(), abs=1e-12)
    assert result.value["n"] == sum(len(v) for v in VALUES.values())
    assert result.epochs == 1 and result.converged is False
    [record] = result.history
    assert isinstance(record, EpochRecord)
    assert (record.epoch, record.nodes, record.missing) == (0, NODES, [])
    assert record.duration >= 0
    kinds = [e.kind for e in events]
    assert kinds[0] == "waiting" and kinds[-1] == "finished"
    assert kinds.count("result") == len(NODES)
    assert kinds.index("epoch_started") < kinds.index("result") < kinds.index("epoch_finished")
    json.dumps(result.to_dict())  # the output document is plain JSON


def iterative_functions(
    recorder: Recorder, stop_at: int | None
) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any] | None]:
    def analyze(data: Data, epoch: int, previous: Any) -> float:
        recorder.add("analyze", flame.context().node_id, epoch, previous)
        return node_sum(data) * (epoch + 1)

    def aggregate(results: dict[str, Any], epoch: int, previous: Any) -> float:
        recorder.add("aggregate", epoch, sorted(results), previous)
        return (previous or 0.0) + sum(results.values())

    def converged(current: Any, previous: Any, epoch: int) -> bool:
        recorder.add("converged", epoch, current, previous)
        return stop_at is not None and epoch >= stop_at

    return analyze, aggregate, (converged if stop_at is not None else None)


def expected_running_totals(epochs: int) -> list[float]:
    totals, total = [], 0.0
    for epoch in range(epochs):
        total += pooled_sum() * (epoch + 1)
        totals.append(total)
    return totals


def test_multi_epoch_stops_early_when_converged() -> None:
    recorder = Recorder()
    analyze, aggregate, converged = iterative_functions(recorder, stop_at=2)
    result = flame.simulate(
        analyze, aggregate, converged, data=data_spec(), config=config(), epochs=10
    )
    totals = expected_running_totals(3)
    assert result.converged is True
    assert result.epochs == 3 and [r.epoch for r in result.history] == [0, 1, 2]
    assert [r.converged for r in result.history] == [False, False, True]
    assert result.value == pytest.approx(totals[-1])
    assert all(r.nodes == NODES and r.missing == [] for r in result.history)
    # every node ran every epoch exactly once, seeing the previous aggregate
    for node in NODES:
        seen = sorted((e, p) for n, e, p in recorder.of("analyze") if n == node)
        assert [e for e, _ in seen] == [0, 1, 2]
        assert seen[0][1] is None
        assert [p for _, p in seen[1:]] == pytest.approx(totals[:2])
    assert [c[0] for c in recorder.of("aggregate")] == [0, 1, 2]
    assert all(c[1] == NODES for c in recorder.of("aggregate"))


def test_without_converged_runs_the_configured_epochs() -> None:
    recorder = Recorder()
    analyze, aggregate, _ = iterative_functions(recorder, stop_at=None)
    result = flame.simulate(analyze, aggregate, data=data_spec(), config=config(epochs=4))
    assert result.epochs == 4 and result.converged is False
    assert result.value == pytest.approx(expected_running_totals(4)[-1])


def test_epochs_from_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLAME_EPOCHS", "3")
    clean_env.setenv("FLAME_EPOCH_TIMEOUT", "5")
    clean_env.setenv("FLAME_PRESENCE_TIMEOUT", "5")
    recorder = Recorder()
    analyze, aggregate, _ = iterative_functions(recorder, stop_at=None)
    result = flame.simulate(analyze, aggregate, data=data_spec())
    assert result.epochs == 3
    result = flame.simulate(analyze, aggregate, data=data_spec(), epochs=2)  # argument wins
    assert result.epochs == 2


def test_every_message_delivered_twice_gives_the_same_result() -> None:
    results = []
    for duplicate_every in (0, 1, 2):
        recorder = Recorder()
        analyze, aggregate, converged = iterative_functions(recorder, stop_at=2)
        broker = MemoryBroker(duplicate_every=duplicate_every)
        result = flame.simulate(
            analyze, aggregate, converged, data=data_spec(), config=config(epochs=5), broker=broker
        )
        results.append(result)
        # duplicates are processed once: one analyze per node and epoch, one aggregate per epoch
        assert len(recorder.of("analyze")) == 3 * len(NODES)
        assert len(recorder.of("aggregate")) == 3
    assert {r.value for r in results} == {results[0].value}
    assert all([h.nodes for h in r.history] == [NODES] * 3 for r in results)


def test_arrays_travel_through_the_broker() -> None:
    def analyze(data: Data) -> dict[str, Any]:
        x = data.read_csv()["x"]
        return {"x": x, "outer": np.outer(x, x).astype(np.float32), "raw": x.tobytes()}

    def aggregate(results: dict[str, Any]) -> dict[str, Any]:
        for r in results.values():
            assert np.array_equal(np.frombuffer(r["raw"], dtype=np.float64), r["x"])
        return {node: r["outer"] for node, r in results.items()}

    result = flame.simulate(analyze, aggregate, data=data_spec(), config=config())
    for node, values in VALUES.items():
        x = np.array(values)
        np.testing.assert_array_equal(result.value[node], np.outer(x, x).astype(np.float32))


def test_large_array_round_trip() -> None:
    big = np.random.default_rng(1).normal(size=(500, 400))

    def analyze(data: Data, epoch: int, previous: Any) -> Any:
        return big * len(data.read_csv()["x"])

    def aggregate(results: dict[str, Any]) -> Any:
        return sum(results.values())

    result = flame.simulate(analyze, aggregate, data=data_spec(), config=config())
    expected = big * sum(len(v) for v in VALUES.values())
    np.testing.assert_allclose(result.value, expected, rtol=1e-12)


# --- injected messages -----------------------------------------------------------------------


def test_old_duplicate_and_foreign_results_are_not_counted() -> None:
    """Results injected into the aggregator's inbox count once or not at all."""
    broker = MemoryBroker()
    analysis = "inject"
    bogus = 1e9
    injected = {"duplicate": 0, "second": 0, "old": 0, "foreign": 0}

    def hook(envelope: Envelope) -> bool:
        inbox = (analysis, "aggregator")
        if envelope.kind == "result":
            injected["duplicate"] += 1
            injected["second"] += 1
            real = envelope.signed  # the signed message as sent
            assert isinstance(real, bytes)
            broker.inject(*inbox, real)
            broker.inject(*inbox, real)  # the same message id again
            second = Envelope(
                analysis, envelope.sender, "aggregator", "result", envelope.epoch, bogus
            )
            broker.inject(*inbox, encode(second))  # a second, different result
            return False
        if envelope.kind == "aggregate" and envelope.recipient == NODES[0]:
            # the aggregator starts epoch e+1: replay results for the finished epoch e
            injected["old"] += len(NODES)
            injected["foreign"] += 1
            for node in NODES:
                old = Envelope(analysis, node, "aggregator", "result", envelope.epoch, bogus)
                broker.inject(*inbox, encode(old))
            foreign = Envelope(
                analysis, "mallory", "aggregator", "result", envelope.epoch + 1, bogus
            )
            broker.inject(*inbox, encode(foreign))
        return True

    broker.on_send = hook
    for node in ("mallory", "aggregator-2"):  # foreign results before the run, too
        broker.inject(
            analysis,
            "aggregator",
            encode(Envelope(analysis, node, "aggregator", "result", 0, bogus)),
        )
    recorder = Recorder()
    analyze, aggregate, _ = iterative_functions(recorder, stop_at=None)
    result = flame.simulate(
        analyze,
        aggregate,
        data=data_spec(),
        config=config(epochs=3, analysis_id=analysis),
        broker=broker,
    )
    assert result.value == pytest.approx(expected_running_totals(3)[-1])
    assert [r.nodes for r in result.history] == [NODES] * 3
    assert injected == {"duplicate": 9, "second": 9, "old": 6, "foreign": 2}
    assert len(recorder.of("aggregate")) == 3


def test_garbage_in_inboxes_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    broker = MemoryBroker()
    analysis = "garbage"
    wrong_recipient = encode(Envelope(analysis, "alpha", "beta", "result", 0, 123.0))
    other_analysis = encode(Envelope("elsewhere", "alpha", "aggregator", "result", 0, 1e9))
    for inbox in ["aggregator", *NODES]:
        broker.inject(analysis, inbox, b"")
        broker.inject(analysis, inbox, b"garbage bytes \x00\xff")
        broker.inject(analysis, inbox, b"FLM\x01\x00\x00\x00\x02{}")
        broker.inject(analysis, inbox, encode(Envelope(analysis, "x", inbox, "status", 0))[:-3])
        broker.inject(analysis, inbox, bytes(range(256)) * 10)
        broker.inject(analysis, inbox, other_analysis)
    broker.inject(analysis, "aggregator", wrong_recipient)
    result = flame.simulate(
        sum_analyze,
        sum_aggregate,
        data=data_spec(),
        config=config(analysis_id=analysis),
        broker=broker,
    )
    assert result.value["sum"] == pytest.approx(pooled_sum())
    assert "malformed" in caplog.text


def test_crafted_array_frame_is_dropped_not_fatal() -> None:
    broker = MemoryBroker()
    analysis = "crafted"
    frame = encode(Envelope(analysis, "alpha", "aggregator", "status", -1, np.zeros((0, 2))))
    length = int.from_bytes(frame[4:8], "big")
    header = frame[8 : 8 + length].replace(b'"shape":[0,2]', b'"shape":[0,1000000000000000000000]')
    assert header != frame[8 : 8 + length]
    frame = frame[:4] + len(header).to_bytes(4, "big") + header + frame[8 + length :]
    broker.inject(analysis, "aggregator", frame)
    result = flame.simulate(
        sum_analyze,
        sum_aggregate,
        data=data_spec(),
        config=config(analysis_id=analysis),
        broker=broker,
    )
    assert result.value["sum"] == pytest.approx(pooled_sum())


def test_error_from_a_non_participant_does_not_abort() -> None:
    broker = MemoryBroker()
    analysis = "foreign-error"
    forged = Envelope(
        analysis, "mallory", "aggregator", "error", 0, {"node": "mallory", "error": "stop"}
    )
    broker.inject(analysis, "aggregator", encode(forged))
    result = flame.simulate(
        sum_analyze,
        sum_aggregate,
        data=data_spec(),
        config=config(analysis_id=analysis),
        broker=broker,
    )
    assert result.value["sum"] == pytest.approx(pooled_sum())


# --- failures --------------------------------------------------------------------------------

SLOW = {"epoch_timeout": 120.0, "presence_timeout": 120.0}


def test_analyze_raising_on_one_node_fails_fast_naming_it() -> None:
    def analyze(data: Data, epoch: int) -> float:
        if flame.context().node_id == "beta" and epoch == 1:
            raise ValueError("column 'x' has a negative count -7")
        return node_sum(data)

    started = time.monotonic()
    with pytest.raises(RunFailed) as caught:
        flame.simulate(
            analyze, lambda results: 0.0, data=data_spec(), config=config(epochs=3, **SLOW)
        )
    elapsed = time.monotonic() - started
    assert elapsed < 20, elapsed
    message = str(caught.value)
    assert "beta" in message and "ValueError" in message and "negative count -7" in message
    assert caught.value.node == "beta"
    assert caught.value.epoch == 1
    assert "\n" not in message


def test_analyze_calling_sys_exit_fails_fast_naming_the_node() -> None:
    def analyze(data: Data) -> float:
        if flame.context().node_id == "beta":
            raise SystemExit(3)
        return node_sum(data)

    started = time.monotonic()
    with pytest.raises(RunFailed) as caught:
        flame.simulate(
            analyze, lambda results: 0, data=data_spec(), config=config(epoch_timeout=3.0)
        )
    assert time.monotonic() - started < 2.5
    assert caught.value.node == "beta" and "SystemExit" in str(caught.value)


def test_failure_reason_never_carries_a_secret() -> None:
    def analyze(data: Data) -> float:
        raise RuntimeError(f"could not authenticate with {SECRET}")

    with pytest.raises(RunFailed) as caught:
        flame.simulate(
            analyze,
            lambda results: 0,
            data=data_spec(),
            config=config(broker={"token": SECRET}, **SLOW),
        )
    assert SECRET not in str(caught.value)
    assert "could not authenticate" in str(caught.value)


def test_unsendable_result_fails_naming_node_and_path() -> None:
    def analyze(data: Data) -> Any:
        return {"ids": {1, 2, 3}}

    started = time.monotonic()
    with pytest.raises(RunFailed) as caught:
        flame.simulate(analyze, lambda results: 0, data=data_spec(), config=config(**SLOW))
    assert time.monotonic() - started < 20
    assert "body.ids" in str(caught.value) and caught.value.node in NODES


@pytest.mark.parametrize("epochs", [1, 3])
def test_aggregate_raising_fails_fast(epochs: int) -> None:
    def aggregate(results: dict[str, Any], epoch: int) -> float:
        if epoch == epochs - 1:
            raise ZeroDivisionError("no rows at all")
        return 1.0

    started = time.monotonic()
    with pytest.raises(RunFailed) as caught:
        flame.simulate(
            sum_analyze, aggregate, data=data_spec(), config=config(epochs=epochs, **SLOW)
        )
    assert time.monotonic() - started < 20
    message = str(caught.value)
    assert "aggregate" in message and "ZeroDivisionError" in message and "no rows" in message


def test_converged_raising_fails_fast() -> None:
    def converged(current: Any) -> bool:
        raise KeyError("loss")

    started = time.monotonic()
    with pytest.raises(RunFailed, match="converged"):
        flame.simulate(
            sum_analyze, sum_aggregate, converged, data=data_spec(), config=config(epochs=3, **SLOW)
        )
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("epochs", [1, 2])
def test_unsendable_aggregate_fails(epochs: int) -> None:
    started = time.monotonic()
    with pytest.raises(RunFailed, match="cannot be sent"):
        flame.simulate(
            sum_analyze, lambda results: {"nodes": set(results)}, data=data_spec(),
            config=config(epochs=epochs, **SLOW),
        )  # fmt: skip
    assert time.monotonic() - started < 20


# --- quorum and timeouts ---------------------------------------------------------------------


def slow_on(node: str, seconds: float) -> Callable[..., Any]:
    def analyze(data: Data, epoch: int, previous: Any) -> dict[str, Any]:
        if flame.context().node_id == node:
            time.sleep(seconds)
        return sum_analyze(data, epoch, previous)

    return analyze


@pytest.mark.parametrize("via", ["config", "env"])
def test_quorum_completes_without_the_slow_node(clean_env: pytest.MonkeyPatch, via: str) -> None:
    if via == "env":
        clean_env.setenv("FLAME_QUORUM", "2")
        cfg = config(epoch_timeout=1.0)
    else:
        cfg = config(epoch_timeout=1.0, quorum=2)
    result = flame.simulate(slow_on("gamma", 2.5), sum_aggregate, data=data_spec(), config=cfg)
    [record] = result.history
    assert record.nodes == ["alpha", "beta"] and record.missing == ["gamma"]
    without = {n: v for n, v in VALUES.items() if n != "gamma"}
    assert result.value["sum"] == pytest.approx(pooled_sum(without))


def test_without_quorum_a_silent_node_is_a_timeout_naming_it() -> None:
    started = time.monotonic()
    with pytest.raises(RunTimeout) as caught:
        flame.simulate(
            slow_on("gamma", 2.5), sum_aggregate, data=data_spec(), config=config(epoch_timeout=1.0)
        )
    message = str(caught.value)
    assert "missing: gamma" in message
    assert "alpha" not in message.split("missing:")[1]
    assert time.monotonic() - started < 20


def test_quorum_larger_than_the_nodes_is_refused() -> None:
    with pytest.raises(FlameError, match="QUORUM"):
        flame.simulate(sum_analyze, sum_aggregate, data=data_spec(), config=config(quorum=4))


def functions_of(analyze: Callable[..., Any], aggregate: Callable[..., Any]) -> AnalysisFunctions:
    return AnalysisFunctions.of(analyze, aggregate)


class Node(threading.Thread):
    """An analysis node in a thread, keeping its outcome."""

    def __init__(
        self,
        broker: MemoryBroker,
        analysis: str,
        node: str,
        functions: AnalysisFunctions,
        data: Data,
        name: str | None = None,
        wait_timeout: float = 20.0,
    ) -> None:
        super().__init__(name=name or f"flame-{node}", daemon=True)
        self.transport = MemoryTransport(broker, analysis, node)
        self.client = AnalysisClient(
            self.transport,
            aggregator_id="aggregator",
            participants=NODES,
            wait_timeout=wait_timeout,
            seed=0,
        )
        self.functions = functions
        self.data = data
        self.outcome: Any = None

    def run(self) -> None:
        try:
            self.outcome = self.client.run(self.functions, self.data)
        except BaseException as exc:
            self.outcome = exc


def memory_data(node: str) -> Data:
    return Data({"m": MemorySource({"values.csv": csv_of(VALUES[node])})}, node_id=node)


def run_aggregator(aggregator: Aggregator) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = aggregator.execute()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="flame-aggregator", daemon=True)
    thread.start()
    return thread, box


@pytest.mark.parametrize("quorum", [2, None])
def test_a_node_that_never_comes_online(quorum: int | None) -> None:
    broker = MemoryBroker()
    functions = functions_of(sum_analyze, sum_aggregate)
    aggregator = Aggregator(
        MemoryTransport(broker, "presence", "aggregator"),
        functions,
        participants=["alpha", "beta", "ghost"],
        quorum=quorum,
        epoch_timeout=1.0,
        presence_timeout=1.0,
    )
    nodes = [Node(broker, "presence", n, functions, memory_data(n)) for n in ("alpha", "beta")]
    for node in nodes:
        node.start()
    thread, box = run_aggregator(aggregator)
    thread.join(20)
    for node in nodes:
        node.join(20)
    if quorum is None:
        assert isinstance(box.get("error"), RunTimeout)
        assert "ghost" in str(box["error"])
        assert all(isinstance(n.outcome, RunFailed) for n in nodes)  # told to abort
    else:
        result = box["result"]
        assert result.history[0].nodes == ["alpha", "beta"]
        assert result.history[0].missing == ["ghost"]
        assert result.value["sum"] == pytest.approx(float(sum(VALUES["alpha"] + VALUES["beta"])))


# --- restarts and checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize("duplicate_every", [0, 1])
def test_node_restart_mid_run_rejoins(duplicate_every: int) -> None:
    broker = MemoryBroker(duplicate_every=duplicate_every)
    analysis = "restart"
    in_epoch_1 = threading.Event()
    release = threading.Event()
    recorder = Recorder()

    def analyze(data: Data, epoch: int, previous: Any) -> float:
        who = threading.current_thread().name
        recorder.add("analyze", who, epoch, previous)
        if who == "flame-beta-old" and epoch == 1:
            in_epoch_1.set()
            release.wait(30)  # "crashes" here: never sends this epoch's result
        return node_sum(data) * (epoch + 1)

    def aggregate(results: dict[str, Any], epoch: int, previous: Any) -> float:
        return (previous or 0.0) + sum(results.values())

    functions = functions_of(analyze, aggregate)
    aggregator = Aggregator(
        MemoryTransport(broker, analysis, "aggregator"),
        functions,
        participants=NODES,
        epochs=3,
        epoch_timeout=15.0,
        presence_timeout=5.0,
    )
    old = Node(broker, analysis, "beta", functions, memory_data("beta"), name="flame-beta-old")
    others = [Node(broker, analysis, n, functions, memory_data(n)) for n in NODES if n != "beta"]
    for node in [old, *others]:
        node.start()
    thread, box = run_aggregator(aggregator)
    try:
        assert in_epoch_1.wait(10), "beta never reached epoch 1"
        old.transport.kill()
        new = Node(broker, analysis, "beta", functions, memory_data("beta"), name="flame-beta-new")
        new.start()
        thread.join(20)
        new.join(10)
    finally:
        release.set()
    old.join(10)
    for node in others:
        node.join(10)
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert result.value == pytest.approx(expected_running_totals(3)[-1])
    assert [r.nodes for r in result.history] == [NODES] * 3
    new_epochs = sorted(e for who, e, _ in recorder.of("analyze") if who == "flame-beta-new")
    assert new_epochs == [1, 2]
    assert new.outcome is not None and new.outcome.kind == "finished"


class DictStore:
    """A RunStore in memory."""

    def __init__(self, checkpoint: Checkpoint | None = None) -> None:
        self.checkpoint = checkpoint
        self.saved: list[Checkpoint] = []
        self.final: RunResult | None = None

    def load_final(self) -> RunResult | None:
        return None

    def load_checkpoint(self) -> Checkpoint | None:
        return self.saved[-1] if self.saved else self.checkpoint

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        self.saved.append(checkpoint)

    def save_final(self, result: RunResult) -> str:
        self.final = result
        return "memory://final"


def test_checkpoints_are_saved_and_resumed() -> None:
    recorder = Recorder()
    analyze, aggregate, _ = iterative_functions(recorder, stop_at=None)
    store = DictStore()
    result = flame.simulate(
        analyze, aggregate, data=data_spec(), config=config(epochs=3), store=store
    )
    totals = expected_running_totals(3)
    assert [c.next_epoch for c in store.saved] == [1, 2]
    assert [c.previous for c in store.saved] == pytest.approx(totals[:2])
    assert store.final is not None and result.location == "memory://final"

    # a new aggregator resumes after the checkpoint of epoch 0
    resumed_recorder = Recorder()
    analyze, aggregate, _ = iterative_functions(resumed_recorder, stop_at=None)
    resumed = flame.simulate(
        analyze,
        aggregate,
        data=data_spec(),
        config=config(epochs=3),
        store=DictStore(store.saved[0]),
    )
    assert resumed.value == pytest.approx(totals[-1])
    assert [r.epoch for r in resumed.history] == [0, 1, 2]
    assert sorted({e for _, e, _ in resumed_recorder.of("analyze")}) == [1, 2]
    epoch_1_previous = [p for _, e, p in resumed_recorder.of("analyze") if e == 1]
    assert epoch_1_previous == pytest.approx([totals[0]] * len(NODES))


# --- flame.context() -------------------------------------------------------------------------


def test_context_inside_analyze_and_aggregate() -> None:
    def analyze(data: Data, epoch: int) -> dict[str, Any]:
        ctx = flame.context()
        return {
            "node": ctx.node_id,
            "epoch": ctx.epoch,
            "role": ctx.role,
            "analysis": ctx.analysis_id,
            "participants": ctx.participants,
            "aggregator": ctx.aggregator_id,
            "data_node": data.node_id,
            "given_epoch": epoch,
        }

    def aggregate(results: dict[str, Any], epoch: int) -> dict[str, Any]:
        ctx = flame.context()
        return {"results": results, "me": [ctx.node_id, ctx.role, ctx.epoch, epoch]}

    result = flame.simulate(
        analyze, aggregate, data=data_spec(), config=config(epochs=2, analysis_id="ctx-test")
    )
    for node, seen in result.value["results"].items():
        assert seen == {
            "node": node,
            "epoch": 1,
            "role": "analysis",
            "analysis": "ctx-test",
            "participants": NODES,
            "aggregator": "aggregator",
            "data_node": node,
            "given_epoch": 1,
        }
    assert result.value["me"] == ["aggregator", "aggregation", 1, 1]
    with pytest.raises(FlameError):
        flame.context()  # outside a run


def draw_analyze(data: Data, epoch: int) -> list[float]:
    return flame.context().rng.random(4).tolist()


def draw_aggregate(results: dict[str, Any], epoch: int, previous: Any) -> dict[str, Any]:
    history = dict(previous or {})
    history[str(epoch)] = {"nodes": results, "aggregator": flame.context().rng.random(2).tolist()}
    return history


def test_rng_is_reproducible_with_a_seed() -> None:
    def run(seed: int | None) -> dict[str, Any]:
        return flame.simulate(
            draw_analyze, draw_aggregate, data=data_spec(), config=config(epochs=2, seed=seed)
        ).value

    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first != other
    draws = [tuple(v) for e in first.values() for v in e["nodes"].values()]
    assert len(set(draws)) == len(draws) == 2 * len(NODES)  # per node and per epoch
    assert first["0"]["aggregator"] != first["1"]["aggregator"]
    unseeded = run(None), run(None)
    assert unseeded[0] != unseeded[1]


def test_rng_draws_within_one_call_differ() -> None:
    def analyze(data: Data) -> list[list[float]]:
        ctx = flame.context()
        return [ctx.rng.random(3).tolist(), ctx.rng.random(3).tolist()]

    result = flame.simulate(
        analyze, lambda results: results, data=data_spec(), config=config(seed=5)
    )
    for first, second in result.value.values():
        assert first != second


def test_free_form_messages_between_nodes() -> None:
    payload = {"vector": np.arange(5, dtype=np.int16), "note": "hello"}

    def analyze(data: Data) -> dict[str, Any]:
        ctx = flame.context()
        if ctx.node_id == "alpha":
            acked = ctx.send("greeting", payload, to=["beta", "aggregator"], timeout=10)
            try:  # a node outside the run: refused, nothing sent (the address is a channel)
                lost: Any = sorted(ctx.send("greeting", payload, to=["nobody"], timeout=0.3))
            except flame.PolicyRefused as exc:
                lost = "outside this run" in str(exc)
            return {"acked": sorted(acked), "lost": lost}
        if ctx.node_id == "beta":
            got = ctx.receive("greeting", senders=["alpha"], timeout=10)
            started = time.monotonic()
            silent = ctx.receive("greeting", senders=["gamma"], timeout=0.5)
            waited = time.monotonic() - started
            return {
                "from": sorted(got.messages),
                "vector": got.messages["alpha"]["vector"],
                "note": got.messages["alpha"]["note"],
                "missing": got.missing,
                "silent_missing": silent.missing,
                "silent_messages": silent.messages,
                "waited": waited,
            }
        return {}

    def aggregate(results: dict[str, Any]) -> dict[str, Any]:
        got = flame.context().receive("greeting", senders=["alpha"], timeout=10)
        return {"results": results, "aggregator_got": got.messages, "missing": got.missing}

    value = flame.simulate(analyze, aggregate, data=data_spec(), config=config()).value
    assert value["results"]["alpha"] == {"acked": ["aggregator", "beta"], "lost": True}
    beta = value["results"]["beta"]
    assert beta["from"] == ["alpha"] and beta["missing"] == []
    np.testing.assert_array_equal(beta["vector"], payload["vector"])
    assert beta["vector"].dtype == np.int16
    assert beta["note"] == "hello"
    assert beta["silent_missing"] == ["gamma"] and beta["silent_messages"] == {}
    assert 0.4 <= beta["waited"] < 5
    assert value["missing"] == []
    np.testing.assert_array_equal(value["aggregator_got"]["alpha"]["vector"], payload["vector"])


def test_send_and_receive_default_to_the_other_analysis_nodes() -> None:
    """Not the aggregator: it never answers a node's round, so a default that named it made
    every default receive come back with the aggregator missing (and every send wait)."""

    def analyze(data: Data) -> dict[str, Any]:
        ctx = flame.context()
        acknowledged = ctx.send("hi", ctx.node_id, timeout=10)
        assert acknowledged == {n for n in NODES if n != ctx.node_id}
        got = ctx.receive("hi", timeout=10.0)
        return {"messages": got.messages, "missing": got.missing}

    value = flame.simulate(
        analyze, lambda results: results, data=data_spec(), config=config()
    ).value
    for node, seen in value.items():
        assert seen["messages"] == {n: n for n in NODES if n != node}
        assert seen["missing"] == []


def test_result_over_the_broker_limit_fails_naming_the_node() -> None:
    def analyze(data: Data) -> Any:
        size = 10_000 if flame.context().node_id == "gamma" else 10
        return np.zeros(size)

    started = time.monotonic()
    with pytest.raises(RunFailed) as caught:
        flame.simulate(
            analyze,
            lambda results: 0,
            data=data_spec(),
            config=config(broker={"max_message_bytes": 4096}, **SLOW),
        )
    assert time.monotonic() - started < 20
    assert caught.value.node == "gamma"
    assert "limit" in str(caught.value)


def test_aggregator_restart_resumes_from_its_checkpoint() -> None:
    """The first aggregator dies after consuming epoch 1's results; the nodes re-send them."""
    broker = MemoryBroker()
    analysis = "agg-restart"
    store = DictStore()
    in_aggregate = threading.Event()
    release = threading.Event()
    recorder = Recorder()

    def analyze(data: Data, epoch: int, previous: Any) -> float:
        recorder.add("analyze", flame.context().node_id, epoch, previous)
        return node_sum(data) * (epoch + 1)

    def aggregate(results: dict[str, Any], epoch: int, previous: Any) -> float:
        if threading.current_thread().name == "flame-aggregator" and epoch == 1:
            in_aggregate.set()
            release.wait(30)  # the first aggregator "crashes" while aggregating epoch 1
        return (previous or 0.0) + sum(results.values())

    functions = functions_of(analyze, aggregate)

    def make_aggregator() -> Aggregator:
        return Aggregator(
            MemoryTransport(broker, analysis, "aggregator"),
            functions,
            participants=NODES,
            epochs=3,
            epoch_timeout=3.0,
            presence_timeout=3.0,
            store=store,
        )

    first = make_aggregator()
    nodes = [Node(broker, analysis, n, functions, memory_data(n)) for n in NODES]
    for node in nodes:
        node.start()
    first_thread, _ = run_aggregator(first)
    try:
        assert in_aggregate.wait(10)
        first.transport.kill()  # type: ignore[attr-defined]
        assert [c.next_epoch for c in store.saved] == [1]
        second = make_aggregator()
        box: dict[str, Any] = {}

        def resume() -> None:
            try:
                box["result"] = second.execute()
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=resume, name="flame-aggregator-2", daemon=True)
        thread.start()
        thread.join(20)
    finally:
        release.set()
    first_thread.join(10)
    for node in nodes:
        node.join(25)
    assert "error" not in box, box.get("error")
    assert box["result"].value == pytest.approx(expected_running_totals(3)[-1])


def test_receive_does_not_serve_a_stale_message_from_an_earlier_epoch() -> None:
    def analyze(data: Data, epoch: int) -> Any:
        ctx = flame.context()
        if ctx.node_id == "alpha":
            if epoch == 0:
                time.sleep(0.8)  # too late for beta's receive in epoch 0
            ctx.send("update", {"sent_in": epoch}, to=["beta"], timeout=5)
            return None
        if ctx.node_id == "beta":
            got = ctx.receive("update", senders=["alpha"], timeout=0.3 if epoch == 0 else 5)
            return {"got": got.messages, "missing": got.missing}
        return None

    value = flame.simulate(
        analyze, lambda results: results, data=data_spec(), config=config(epochs=2)
    ).value
    assert value["beta"] == {"got": {"alpha": {"sent_in": 1}}, "missing": []}

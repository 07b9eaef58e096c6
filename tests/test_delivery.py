"""Reliability pieces in one process (the fault matrix runs them across real processes):
end-to-end result acks and re-sends, leftovers of an earlier aggregator process, a node
outside the roster, the analyst's traceback (trimmed, masked, by policy), forwarded node
logs, and storage writes retried through a blip.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import flame
from flame.aggregator.records import Checkpoint, RunResult
from flame.aggregator.run_store import StorageRunStore
from flame.aggregator.server import Aggregator
from flame.analysis.functions import AnalysisFunctions
from flame.clients.file_store import FileStore
from flame.clients.object_store import StorageError
from flame.config import load_config
from flame.data import Data, MemorySource
from flame.errors import ConfigError, RunFailed
from flame.node.runtime import AnalysisClient
from flame.privacy.policy import NodePolicy
from flame.privacy.tracebacks import analysis_traceback, trim_traceback_text
from flame.transport.memory import MemoryBroker, MemoryTransport
from flame.wire.envelope import Envelope

DATA = {"a": {"v.csv": "v\n1\n2\n"}, "b": {"v.csv": "v\n10\n"}, "c": {"v.csv": "v\n100\n7\n"}}


def analyze(data: Data, epoch: int, previous: Any) -> dict[str, float]:
    values = data.read_csv()["v"]
    base = 0.0 if previous is None else previous["mean"]
    return {"n": float(values.size), "residual": float((values - base).sum())}


def aggregate(results: dict[str, Any], epoch: int, previous: Any) -> dict[str, float]:
    base = 0.0 if previous is None else previous["mean"]
    n = sum(r["n"] for r in results.values())
    return {"mean": base + 0.5 * sum(r["residual"] for r in results.values()) / n}


def reference(epochs: int) -> Any:
    return flame.simulate(analyze, aggregate, data=DATA, epochs=epochs).value


def config(**values: Any) -> Any:
    defaults: dict[str, Any] = {"epochs": 3, "epoch_timeout": 30.0, "presence_timeout": 30.0}
    return load_config(**{**defaults, **values})


# --- delivery --------------------------------------------------------------------------------


def test_a_lost_result_is_resent_until_acknowledged() -> None:
    """The broker loses b's first result of every epoch; without the re-send the run would
    wait for its 30 s epoch timeout, with it the answer is the same and comes quickly."""
    lost: set[int] = set()

    def drop(envelope: Envelope) -> bool:
        if envelope.kind == "result" and envelope.sender == "b" and envelope.epoch not in lost:
            lost.add(envelope.epoch)
            return True
        return False

    broker = MemoryBroker(on_send=lambda envelope: not drop(envelope))
    started = time.monotonic()
    result = flame.simulate(
        analyze, aggregate, data=DATA, config=config(resend_interval=0.3), broker=broker
    )
    assert lost == {0, 1, 2}
    assert result.value == reference(3)
    assert time.monotonic() - started < 15


def test_lost_acks_only_cost_resends() -> None:
    broker = MemoryBroker(on_send=lambda envelope: envelope.kind != "ack")
    result = flame.simulate(
        analyze, aggregate, data=DATA, config=config(resend_interval=0.2), broker=broker
    )
    assert result.value == reference(3)


def test_a_slow_aggregate_does_not_make_nodes_resend_their_results() -> None:
    """The last results of an epoch wait for the next kick-off as their ack; when aggregating
    takes long (a threshold decryption takes minutes) they get an ack instead, so nodes do not
    re-send megabytes of ciphertexts every resend interval meanwhile."""
    sent: dict[str, int] = {}

    def count(envelope: Envelope) -> bool:
        if envelope.kind == "result":
            sent[envelope.sender] = sent.get(envelope.sender, 0) + 1
        return True

    def slow_aggregate(results: dict[str, Any], epoch: int, previous: Any) -> Any:
        time.sleep(3.0)  # three resend intervals
        return aggregate(results, epoch, previous)

    result = flame.simulate(
        analyze,
        slow_aggregate,
        data=DATA,
        config=config(epochs=2, resend_interval=1.0),
        broker=MemoryBroker(on_send=count),
    )
    assert result.value == reference(2)
    assert sent == {"a": 2, "b": 2, "c": 2}, sent  # one result per node and epoch


def test_leftovers_of_an_earlier_aggregator_process_are_not_acted_on() -> None:
    """A persistent broker session may still hold an abort and a `finished` of an earlier
    run of this analysis id: they name another aggregator process and are dropped."""
    broker = MemoryBroker()
    for node in DATA:
        for kind, body in (
            ("abort", {"reason": "node 'x' stopped: SIGTERM", "session": "0ld"}),
            ("finished", {"value": {"mean": -1.0}, "session": "0ld"}),
        ):
            broker.publish(Envelope("local", "aggregator", node, kind, 0, body))  # type: ignore[arg-type]
    result = flame.simulate(analyze, aggregate, data=DATA, config=config(), broker=broker)
    assert result.value == reference(3)


def test_a_node_outside_the_roster_is_told_and_stops_with_a_config_error() -> None:
    broker = MemoryBroker()
    functions = AnalysisFunctions.of(analyze, aggregate)
    aggregator = Aggregator(
        MemoryTransport(broker, "roster", "aggregator"),
        functions,
        participants=["a", "b"],
        epochs=2,
        epoch_timeout=20,
        presence_timeout=20,
    )
    outcome: dict[str, Any] = {}

    def play(node: str) -> None:
        client = AnalysisClient(
            MemoryTransport(broker, "roster", node),
            aggregator_id="aggregator",
            participants=["a", "b", "c"],
            wait_timeout=20,
        )
        data = Data({"memory": MemorySource(DATA[node])}, node_id=node)
        try:
            outcome[node] = client.run(functions, data).value
        except BaseException as exc:
            outcome[node] = exc

    threads = [threading.Thread(target=play, args=(n,), daemon=True) for n in ("c", "a", "b")]
    for thread in threads:
        thread.start()
    result = aggregator.execute()
    for thread in threads:
        thread.join(20)
    assert isinstance(outcome["c"], ConfigError)
    assert "'c' is not a participant" in str(outcome["c"])
    assert outcome["a"] == outcome["b"] == result.value


def _restart_aggregator_without_storage(crash_in_epoch: int) -> tuple[Any, list[Any]]:
    """Nodes in threads; the first aggregator dies inside aggregate() of `crash_in_epoch`
    (its broker session and memory gone), a second one, without storage, takes over."""
    broker = MemoryBroker()
    calls: list[tuple[str, int]] = []
    inside = threading.Event()
    release = threading.Event()

    def counting(data: Data, epoch: int, previous: Any) -> dict[str, float]:
        calls.append((flame.context().node_id, epoch))
        return analyze(data, epoch, previous)

    def crashing(results: dict[str, Any], epoch: int, previous: Any) -> dict[str, float]:
        if threading.current_thread().name == "first" and epoch == crash_in_epoch:
            inside.set()
            release.wait(30)
        return aggregate(results, epoch, previous)

    functions = AnalysisFunctions.of(counting, crashing)

    def make() -> Aggregator:
        return Aggregator(
            MemoryTransport(broker, "restart", "aggregator"),
            functions,
            participants=list(DATA),
            epochs=3,
            epoch_timeout=20,
            presence_timeout=20,
        )

    result = _replace_the_aggregator(broker, "restart", functions, make, inside, release)
    return result.value, calls


def _replace_the_aggregator(
    broker: MemoryBroker,
    analysis: str,
    functions: AnalysisFunctions,
    make: Any,
    dead: threading.Event,
    release: threading.Event,
) -> Any:
    """Nodes in threads; a first aggregator (thread "first") runs until it signals `dead`, is
    killed (broker session gone), and a second one from `make` finishes the run."""
    outcome: dict[str, Any] = {}

    def play(node: str) -> None:
        client = AnalysisClient(
            MemoryTransport(broker, analysis, node),
            aggregator_id="aggregator",
            participants=list(DATA),
            wait_timeout=40,
        )
        data = Data({"memory": MemorySource(DATA[node])}, node_id=node)
        outcome[node] = client.run(functions, data).value

    nodes = [threading.Thread(target=play, args=(n,), daemon=True) for n in DATA]
    for thread in nodes:
        thread.start()
    first = make()
    threading.Thread(target=lambda: _quietly(first.execute), name="first", daemon=True).start()
    try:
        assert dead.wait(20)
        first.transport.kill()
        result = make().execute()
    finally:
        release.set()
    for thread in nodes:
        thread.join(20)
    assert all(outcome[node] == result.value for node in DATA)
    return result


def _quietly(call: Any) -> None:
    with contextlib.suppress(BaseException):  # how the "crashed" aggregator ends is moot
        call()


def test_an_aggregator_restarted_in_epoch_0_without_storage_continues_from_cached_results() -> None:
    value, calls = _restart_aggregator_without_storage(crash_in_epoch=0)
    assert value == reference(3)
    assert sorted(calls) == sorted((node, epoch) for node in DATA for epoch in range(3))


def test_an_aggregator_restarted_later_without_storage_starts_the_run_over() -> None:
    value, calls = _restart_aggregator_without_storage(crash_in_epoch=1)
    assert value == reference(3)
    # epochs 0 and 1 twice (the first run, then the new one), epoch 2 once
    assert sorted(calls) == sorted((node, epoch) for node in DATA for epoch in (0, 0, 1, 1, 2))


def test_an_aggregator_dying_right_after_a_kick_off_resumes_level_with_the_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The aggregator sends epoch 1's aggregate and dies before anything else. Its checkpoint
    was saved after the kick-off: restarted, it resumed at epoch 1 while the nodes were in
    epoch 2, ignored their "future" results and stalled until the epoch timeout. The
    checkpoint is now saved first, so the restart resumes where the nodes are."""
    broker = MemoryBroker()
    died = threading.Event()
    release = threading.Event()
    sending = Aggregator._send_parameters

    def send_then_die(self: Aggregator, epoch: int, value: Any) -> None:
        sending(self, epoch, value)
        if threading.current_thread().name == "first" and epoch == 1:
            died.set()
            release.wait(30)

    monkeypatch.setattr(Aggregator, "_send_parameters", send_then_die)
    functions = AnalysisFunctions.of(analyze, aggregate)

    def make() -> Aggregator:
        return Aggregator(
            MemoryTransport(broker, "resume", "aggregator"),
            functions,
            participants=list(DATA),
            epochs=4,
            epoch_timeout=20,
            presence_timeout=20,
            store=StorageRunStore(FileStore(tmp_path), "resume", "aggregator"),
        )

    result = _replace_the_aggregator(broker, "resume", functions, make, died, release)
    assert result.value == reference(4)
    assert [record.epoch for record in result.history] == [0, 1, 2, 3]


def test_a_slow_node_skips_the_queued_aggregates_of_a_finished_run() -> None:
    """In-process (no child to stop), the slow node finishes its epoch 0 and then finds the
    aggregates of epochs 0 and 1 and `finished` queued: it takes `finished`."""
    calls: list[tuple[str, int]] = []

    def slow_b(data: Data, epoch: int, previous: Any) -> dict[str, float]:
        node = flame.context().node_id
        calls.append((node, epoch))
        if node == "b":
            time.sleep(2.5)
        return analyze(data, epoch, previous)

    result = flame.simulate(
        slow_b, aggregate, data=DATA, config=config(epochs=3, epoch_timeout=0.5, quorum=2)
    )
    assert [epoch for node, epoch in calls if node == "b"] == [0]
    assert all(record.missing == ["b"] for record in result.history)


# --- the analyst's traceback -----------------------------------------------------------------


def _fails(data: Data, epoch: int) -> Any:
    if flame.context().node_id == "b":
        return _lookup({"weight": 1}, "token-s3cr3t-value")
    return {"n": 1.0, "residual": 0.0}


def _lookup(row: dict[str, Any], name: str) -> Any:
    return row[name]


def test_the_failing_analysis_line_reaches_the_analyst_masked() -> None:
    with pytest.raises(RunFailed) as failure:
        flame.simulate(
            _fails,
            aggregate,
            data=DATA,
            config=config(epochs=1),
            policy={"b": NodePolicy()},
        )
    text = failure.value.traceback or ""
    assert failure.value.node == "b"
    assert "in _fails" in text and "in _lookup" in text and "KeyError" in text
    assert "flame/federated" not in text and "flame/simulate" not in text


def test_the_failure_is_kept_in_storage_with_its_traceback(tmp_path: Path) -> None:
    from flame.config import StorageSettings

    settings = config(epochs=1).model_copy(
        update={"storage": StorageSettings(results_dir=tmp_path), "analysis_id": "kept"}
    )
    with pytest.raises(RunFailed):
        flame.simulate(_fails, aggregate, data=DATA, config=settings)
    records = list((tmp_path / "kept" / "failures").glob("*.json"))
    assert len(records) == 1, list(tmp_path.rglob("*"))
    kept = json.loads(records[0].read_text())
    assert "node 'b' failed in epoch 0" in kept["reason"]
    assert "in _lookup" in kept["traceback"] and kept["node"] == "b"


def test_a_node_policy_keeps_its_traceback_at_home() -> None:
    with pytest.raises(RunFailed) as failure:
        flame.simulate(
            _fails,
            aggregate,
            data=DATA,
            config=config(epochs=1),
            policy={"b": NodePolicy(send_tracebacks=False)},
        )
    assert failure.value.traceback is None
    assert "KeyError" in str(failure.value)


def test_traceback_text_is_masked_and_capped() -> None:
    try:
        _lookup({}, "secret-token-123")
    except KeyError as exc:
        text = analysis_traceback(exc, ["secret-token-123"])
    assert "secret-token-123" not in text and "***" in text
    assert "test_delivery.py" in text
    long = "\n".join(f"line {i}" for i in range(5000))
    capped = trim_traceback_text(long, limit=1000)
    assert len(capped) <= 1000 and capped.endswith("line 4999") and "characters cut" in capped


# --- forwarded logs ---------------------------------------------------------------------------


def _chatty(data: Data, epoch: int) -> Any:
    logging.getLogger("my.analysis").warning("epoch %d: %d rows", epoch, 2)
    return {"n": 1.0, "residual": 0.0}


def test_node_logs_are_forwarded_only_where_the_policy_allows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="flame.node_logs")
    flame.simulate(
        _chatty,
        aggregate,
        data=DATA,
        config=config(epochs=1),
        policy={"a": NodePolicy(forward_logs=True), "b": NodePolicy(), "c": NodePolicy()},
    )
    forwarded = [r.getMessage() for r in caplog.records if r.name == "flame.node_logs"]
    assert any(m.startswith("[a] WARNING my.analysis: epoch 0: 2 rows") for m in forwarded)
    assert not [m for m in forwarded if m.startswith(("[b]", "[c]"))]


# --- storage ---------------------------------------------------------------------------------


class _Flaky:
    """A store whose first `failures` writes fail, as a storage server that is restarting."""

    def __init__(self, inner: FileStore, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _maybe_fail(self, key: str) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StorageError(f"storage {key}: cannot reach 127.0.0.1:9 (ConnectionRefused)")

    def put_bytes(self, key: str, data: Any, **kw: Any) -> Any:
        self._maybe_fail(key)
        return self.inner.put_bytes(key, data, **kw)

    def put_json(self, key: str, value: Any) -> Any:
        self._maybe_fail(key)
        return self.inner.put_json(key, value)


def test_storage_writes_are_retried_through_a_blip(tmp_path: Path) -> None:
    store = StorageRunStore(_Flaky(FileStore(tmp_path), 3), "blip", "aggregator", retry_s=30)  # type: ignore[arg-type]
    store.save_checkpoint(Checkpoint(1, {"mean": 1.5}, []))
    assert store.load_checkpoint() == Checkpoint(1, {"mean": 1.5}, [])
    location = store.save_final(RunResult("blip", {"mean": 2.0}, True, 1, []))
    assert location


def test_storage_that_stays_down_fails_naming_the_object(tmp_path: Path) -> None:
    store = StorageRunStore(_Flaky(FileStore(tmp_path), 10**6), "down", "aggregator", retry_s=1)  # type: ignore[arg-type]
    with pytest.raises(StorageError) as failure:
        store.save_checkpoint(Checkpoint(1, {"mean": 1.5}, []))
    text = str(failure.value)
    assert "down/epochs/0" in text and "FLAME_STORAGE__RETRY_S" in text
    assert "ConnectionRefused" in text

"""Red-team attacks on the reliability work (issue 22): partitions at bad moments, a broker
operator replaying or clearing retained statuses, clocks stepped back, data files changed
behind the fingerprint's back, CSV cells in warnings.

Each test asserts the SAFE outcome: the right result, or a loud failure naming the cause;
never exit 0 with a wrong result, never a silent stall to the epoch deadline where issue 22
promises otherwise. Tests that show an open hole are `xfail(strict=True)` with the reason.
Real `flame run` processes, a real Mosquitto and the TCP proxy, as tests/test_fault_matrix.py.
Epoch deadlines are far beyond each test's own bound, so a stall fails the test, not a clock.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker import ADMIN, Broker, have_mosquitto
from nodes import AGGREGATOR, Federation, StatusWatcher, shifted_clock
from servers.tcp_proxy import TcpProxy
from test_fault_matrix import (
    NODES,
    Row,
    pooled_estimates,
    simulated,
    write_analysis,
)

from flame.data import Data, LocalSource
from flame.data.versions import DataVersions
from flame.errors import DataError

pytestmark = pytest.mark.skipif(
    not have_mosquitto(), reason="these attacks need Mosquitto (ACL, retained, persistence)"
)


@pytest.fixture(scope="module")
def durable_broker() -> Iterator[Broker]:
    with Broker(save_every_change=True) as broker:
        yield broker


@pytest.fixture
def row(tmp_path: Path, durable_broker: Broker, request: pytest.FixtureRequest) -> Iterator[Row]:
    name = request.node.name.removeprefix("test_")
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]  # parametrized ids stay apart
    made = Row(tmp_path, durable_broker, f"rt-{name[:32]}-{digest}")
    yield made
    made.close()


class Operator:
    """The broker's operator (user `admin`): sees every status payload as published, raw,
    and can publish or clear any retained message. Signatures it cannot make; replays it can."""

    def __init__(self, broker: Broker, analysis_id: str) -> None:
        self.analysis_id = analysis_id
        self.seen: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"op-{os.getpid()}")
        self._client.username_pw_set(ADMIN, broker.password)
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port, keepalive=30)
        self._client.subscribe(f"flame/{analysis_id}/+/status", qos=1)
        self._client.loop_start()

    def _on_message(self, client: object, userdata: object, message: mqtt.MQTTMessage) -> None:
        node = message.topic.split("/")[2]
        with self._lock:
            self.seen.append((node, bytes(message.payload)))

    def statuses(self, node: str) -> list[bytes]:
        with self._lock:
            return [payload for who, payload in self.seen if who == node and payload]

    def publish_retained(self, node: str, payload: bytes) -> None:
        info = self._client.publish(
            f"flame/{self.analysis_id}/{node}/status", payload, qos=1, retain=True
        )
        info.wait_for_publish(10)
        assert info.is_published()

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def _state(payload: bytes) -> str:
    import json

    return str(json.loads(payload).get("state"))


def own_storage(tmp: Path) -> dict[str, str]:
    """Each node's own storage (one folder; keys are per node): where it keeps its process
    generation, so a broker that lost the retained statuses cannot reset it. Without any
    storage a node has only the broker's copy (documented limit, logged at connect)."""
    return {"FLAME_STORAGE__RESULTS_DIR": str(tmp / "storage")}


# --- broker operator: replays ---------------------------------------------------------------


def test_operator_replays_a_dead_nodes_last_status_under_quorum(row: Row) -> None:
    """node-3 is SIGKILLed in epoch 1 under FLAME_QUORUM=2; its last will marks it gone. The
    broker operator then re-publishes node-3's own latest genuine status (the 'computing'
    one, same instance and seq), as retained. Safe: node-3 stays gone, the run finishes
    without waiting for it. Seen: the aggregator takes it back and waits for it."""
    folder = write_analysis(row.tmp / "analysis", slow={"*": 3.0})  # epochs of 3 s
    operator = Operator(row.broker, row.analysis_id)
    try:
        federation = row.federation(folder, epochs=4, FLAME_QUORUM="2", FLAME_EPOCH_TIMEOUT="300")
        watcher = row.watch()
        federation.start_all()
        watcher.wait_for("node-3", "computing", 1, timeout=90)
        federation.kill("node-3")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the will is out
            if any(_state(p) == "offline" for p in operator.statuses("node-3")):
                break
            time.sleep(0.1)
        alive = [p for p in operator.statuses("node-3") if _state(p) not in ("offline",)]
        assert alive, "no status of node-3 recorded"
        time.sleep(0.3)  # the aggregator has taken node-3 for gone (epoch 1 or 2 runs on)
        operator.publish_retained("node-3", alive[-1])  # a genuine status, replayed
        aggregator = federation.processes[AGGREGATOR]
        assert aggregator.wait(90) == 0, aggregator.tail()
        expected = pooled_estimates(folder, [NODES] + [("node-1", "node-2")] * 3)
        value = aggregator.value()
        assert value["nodes"] == ["node-1", "node-2"]
        assert value["estimate"] == pytest.approx(expected, rel=1e-12)
    finally:
        operator.close()


def test_node_restarted_clock_back_after_its_retained_status_was_cleared(row: Row) -> None:
    """node-2 is SIGKILLed in epoch 1; its retained status is cleared (an empty retained
    message: what a broker operator, or a volatile broker's restart, leaves); node-2 restarts
    with its clock 10 min back. Safe: it is a restart (a new instance, statuses signed after
    the aggregator started), the run completes right, well before the epoch deadline."""
    folder = write_analysis(row.tmp / "analysis", slow={"*": 0.3, "node-2": 3.0})
    expected = simulated(folder, NODES, epochs=3)
    operator = Operator(row.broker, row.analysis_id)
    try:
        watcher = row.watch()
        federation = row.federation(
            folder, epochs=3, FLAME_EPOCH_TIMEOUT="300", **own_storage(row.tmp)
        )
        federation.start_all()
        watcher.wait_for("node-2", "computing", 1, timeout=90)
        federation.kill("node-2")
        watcher.wait_for("node-2", "offline", timeout=30)
        operator.publish_retained("node-2", b"")  # cleared
        federation.start("node-2", **shifted_clock(-600.0))
        values = federation.finish(timeout=90)
    finally:
        operator.close()
    assert values[AGGREGATOR] == expected


def test_volatile_broker_restart_then_node_restarted_clock_back(tmp_path: Path) -> None:
    """No operator: node-2 crashes in epoch 1, the broker (persistence off) restarts while
    node-2 is down, node-2 comes back with its clock 10 min back (an NTP step)."""
    folder = write_analysis(tmp_path / "analysis", slow={"*": 0.3, "node-2": 3.0})
    expected = simulated(folder, NODES, epochs=3)
    with Broker(persistence=False, save_every_change=True) as broker:
        row = Row(tmp_path, broker, "rt-volatile-clock-back")
        try:
            watcher = row.watch()
            federation = row.federation(
                folder, epochs=3, FLAME_EPOCH_TIMEOUT="300", **own_storage(tmp_path)
            )
            federation.start_all()
            watcher.wait_for("node-2", "computing", 1, timeout=90)
            federation.kill("node-2")
            time.sleep(0.5)
            broker.stop()
            time.sleep(1.0)
            broker.start()
            time.sleep(3.0)  # the others reconnect and republish their statuses
            federation.start("node-2", **shifted_clock(-600.0))
            values = federation.finish(timeout=120)
        finally:
            row.close()
    assert values[AGGREGATOR] == expected


def test_retained_statuses_cleared_between_runs_hide_a_restarted_node(row: Row) -> None:
    """Run 1 of the analysis: node-2 crashes once and comes back (generation 2); it finishes.
    The retained statuses are then cleared (an operator's routine clean-up of a finished
    analysis, or a broker without persistence restarted), and the analysis is run again under
    the same id. Safe: run 2 completes right (no replay, no attacker, no wrong clock).
    Seen: `ignored a stale status of node-2 (state 'waiting'): an earlier process ... shows
    nothing new`, then `only 2 of 3 nodes came online within 60 s (missing: node-2)`."""
    folder = write_analysis(row.tmp / "analysis", slow={"*": 0.3, "node-2": 1.5})
    expected = simulated(folder, NODES, epochs=3)
    operator = Operator(row.broker, row.analysis_id)
    try:
        watcher = row.watch()
        first = row.federation(folder, epochs=3, FLAME_EPOCH_TIMEOUT="300", **own_storage(row.tmp))
        first.start_all()
        watcher.wait_for("node-2", "computing", 1, timeout=90)
        first.kill("node-2")
        first.start("node-2")
        assert first.finish(timeout=90)[AGGREGATOR] == expected
        for node in (AGGREGATOR, *NODES):
            operator.publish_retained(node, b"")  # clean-up between runs
        time.sleep(0.5)
        second = row.federation(folder, epochs=3, FLAME_EPOCH_TIMEOUT="300", **own_storage(row.tmp))
        # A new run, not a resume of run 1's checkpoints: its aggregator starts on empty storage.
        second.start(AGGREGATOR, FLAME_STORAGE__RESULTS_DIR=str(row.tmp / "aggregator-run-2"))
        for node in NODES:
            second.start(node)
        values = second.finish(timeout=90)
    finally:
        operator.close()
    assert values[AGGREGATOR] == expected


@pytest.mark.parametrize(
    ("aggregator_shift", "second_shift"),
    [(0.0, -600.0), (7200.0, 0.0)],
    ids=["second-clock-10min-back", "aggregator-clock-2h-ahead"],
)
def test_split_brain_with_different_clocks_fails_loudly(
    row: Row, aggregator_shift: float, second_shift: float
) -> None:
    """A second node-2 process starts while the first is alive and computing, the clocks
    disagreeing (the second 10 min back; or the aggregator 2 h ahead, so every conflict
    report looks 'signed before it started'). Safe: the run ends naming the two processes,
    or completes with the right result; never a silent stall or a mix."""
    folder = write_analysis(row.tmp / "analysis", slow={"*": 3.0})
    expected = simulated(folder, NODES, epochs=4)
    watcher = row.watch()
    federation = row.federation(folder, epochs=4, FLAME_EPOCH_TIMEOUT="300")
    federation.start(AGGREGATOR, **(shifted_clock(aggregator_shift) if aggregator_shift else {}))
    for node in NODES:
        federation.start(node)
    watcher.wait_for("node-2", "computing", 1, timeout=90)
    first = federation.processes["node-2"]
    second = federation.start("node-2", **(shifted_clock(second_shift) if second_shift else {}))
    aggregator = federation.processes[AGGREGATOR]
    code = aggregator.wait(90)
    for process in (first, second):
        if process.returncode is None:
            process.wait(30)
    assert "connected to broker" in second.stderr(), "the second process never joined"
    if code == 0:
        assert aggregator.value() == expected
    else:
        logs = aggregator.stderr() + first.stderr() + second.stderr()
        assert "two processes claim node 'node-2'" in logs, aggregator.tail()


def test_operator_forges_the_data_version_in_the_history(row: Row) -> None:
    """The broker operator re-publishes node-2's genuine 'computing' status with another
    `data` digest (and the next seq; the signature no longer matches) while node-2 computes
    the last epoch. Safe: the history records node-2's genuine data version (the one its
    signed statuses carry), or the forged status is dropped."""
    import json

    folder = write_analysis(row.tmp / "analysis", slow={"*": 0.3, "node-2": 3.0})
    operator = Operator(row.broker, row.analysis_id)
    forged = "f" * 64
    try:
        watcher = row.watch()
        federation = row.federation(folder, epochs=2, FLAME_EPOCH_TIMEOUT="300")
        federation.start_all()
        watcher.wait_for("node-2", "computing", 1, timeout=90)
        time.sleep(0.3)
        genuine = [
            json.loads(p)
            for p in operator.statuses("node-2")
            if _state(p) == "computing" and json.loads(p).get("epoch") == 1
        ][-1]
        real = genuine["data"]
        assert isinstance(real, str) and len(real) == 64
        fake = {**genuine, "data": forged, "seq": genuine["seq"] + 1}
        operator.publish_retained("node-2", json.dumps(fake, separators=(",", ":")).encode())
        done = watcher.wait_for(AGGREGATOR, "done", timeout=90)
        federation.finish(timeout=60)
    finally:
        operator.close()
    versions = (done.get("last_epoch") or {}).get("data_versions") or {}
    assert versions.get("node-2") == real, versions


# --- partitions at bad moments --------------------------------------------------------------


@contextlib.contextmanager
def _through_proxy(
    row: Row, folder: Path, link: str, *, epochs: int, **extra: str
) -> Iterator[tuple[TcpProxy, Federation, StatusWatcher]]:
    """The run of `folder` with `link`'s broker connection through a TcpProxy the test cuts
    (send timeout 2 s, epoch deadline 300 s): the aggregator starts first, an analysis
    `link` after the other nodes; `row`'s status watcher is on before any of them."""
    with TcpProxy("127.0.0.1", row.broker.port) as proxy:
        watcher = row.watch()
        federation = row.federation(
            folder,
            epochs=epochs,
            FLAME_BROKER__SEND_TIMEOUT="2",
            FLAME_EPOCH_TIMEOUT="300",
            **extra,
        )
        through = {"FLAME_BROKER__URL": f"mqtt://{proxy.endpoint}"}
        federation.start(AGGREGATOR, **(through if link == AGGREGATOR else {}))
        for node in NODES:
            if node != link:
                federation.start(node)
        if link != AGGREGATOR:
            federation.start(link, **through)
        yield proxy, federation, watcher


def test_node_partitioned_while_the_aggregator_says_finished(row: Row) -> None:
    """node-2's link black-holes right after its last result reached the broker, for 20 s
    (past 1.5 x keepalive: the broker drops it and fires its will): the aggregator finishes
    meanwhile; node-2 must still end with the final value once the link returns (its
    persistent session holds `finished`), not exit 1 or keep re-sending forever."""
    folder = write_analysis(row.tmp / "analysis", slow={"*": 0.3})
    expected = simulated(folder, NODES, epochs=2)
    with _through_proxy(row, folder, "node-2", epochs=2) as (proxy, federation, watcher):
        watcher.wait_for("node-2", "sent", 1, timeout=90)
        proxy.black_hole_for(20)
        values = federation.finish(timeout=120)
    assert values[AGGREGATOR] == expected
    assert values["node-2"] == expected


def test_partition_in_the_middle_of_a_chunked_result(row: Row) -> None:
    """node-2's 256 KiB result goes in 16 KiB chunks over a 64 kB/s uplink; 2.5 s into the
    transfer the link black-holes for 10 s (beyond the aggregator's reassembly timeout, 2 x
    the send timeout): half a transfer expires, the rest arrives late, the node re-sends.
    Safe: the right result, no half-message mixed in."""
    folder = write_analysis(
        row.tmp / "analysis", slow={"*": 0.3, "node-2": 1.0}, pad={"node-2": 256 * 1024}
    )
    expected = simulated(folder, NODES, epochs=2)
    with _through_proxy(row, folder, "node-2", epochs=2, FLAME_BROKER__CHUNK_SIZE="16384") as (
        proxy,
        federation,
        watcher,
    ):
        watcher.wait_for("node-2", "computing", 0, timeout=90)
        proxy.uplink_rate = 64_000
        time.sleep(1.0 + 2.5)  # analyze (1 s), then into the transfer
        proxy.black_hole_for(10)
        values = federation.finish(timeout=150)
    assert values[AGGREGATOR] == expected
    assert all(values[node] == expected for node in NODES)


def test_node_back_after_being_declared_gone_under_quorum(row: Row) -> None:
    """node-3's link black-holes for 20 s while it sends its epoch-1 result under
    FLAME_QUORUM=2 (keepalive 5 s, so the broker's 1.5 x keepalive passes with 12 s to spare
    even on a loaded machine: its will fires, it is gone, the epochs go on);
    then the link returns with the held result. Safe: that late result is not mixed into a
    later epoch nor counted twice: the final estimate equals the pooled estimate over the
    nodes each epoch actually used (as the aggregator's log names them)."""
    import re

    folder = write_analysis(row.tmp / "analysis", slow={"*": 2.0, "node-3": 1.0})
    with _through_proxy(
        row, folder, "node-3", epochs=6, FLAME_QUORUM="2", FLAME_BROKER__KEEPALIVE="5"
    ) as (
        proxy,
        federation,
        watcher,
    ):
        watcher.wait_for("node-3", "computing", 1, timeout=90)
        proxy.black_hole_for(20)
        values = federation.finish(timeout=150)
    stderr = federation.processes[AGGREGATOR].stderr()
    missing = {
        int(epoch): names
        for epoch, names in re.findall(r"epoch (\d+) continues with quorum; missing: (.*)", stderr)
    }
    assert missing, "node-3 was never left out: the partition did not bite"
    per_epoch = [tuple(n for n in NODES if n not in missing.get(epoch, "")) for epoch in range(6)]
    expected = pooled_estimates(folder, per_epoch)
    assert values[AGGREGATOR]["estimate"] == pytest.approx(expected, rel=1e-12), per_epoch
    assert values[AGGREGATOR]["nodes"] == list(per_epoch[-1])


def test_flapping_link_every_second(row: Row) -> None:
    """The aggregator's link black-holes 1 s, flows 1 s, for 24 s across several epochs."""
    folder = write_analysis(row.tmp / "analysis", slow={"*": 0.3})
    expected = simulated(folder, NODES, epochs=4)
    with _through_proxy(row, folder, AGGREGATOR, epochs=4) as (proxy, federation, watcher):
        watcher.wait_for(AGGREGATOR, "collecting", 0, timeout=90)
        for _ in range(12):
            proxy.black_hole_for(1.0)
            time.sleep(2.0)
        values = federation.finish(timeout=150)
    assert values[AGGREGATOR] == expected
    assert all(values[node] == expected for node in NODES)


# --- data that changes ----------------------------------------------------------------------


def _rewrite_in_place_keeping_stat(path: Path) -> None:
    """Same size, same inode, same mtime: other digits written into the file (as `cp -p`
    onto an existing file, `rsync --inplace -t`, or a restore tool would leave it)."""
    before = os.stat(path)
    text = path.read_bytes()
    changed = text.replace(b"1.25", b"9.25").replace(b"2.5", b"8.5")
    assert changed != text and len(changed) == len(text)
    with path.open("r+b") as handle:
        handle.write(changed)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (
        before.st_size,
        before.st_ino,
        before.st_mtime_ns,
    )


def test_data_rewritten_in_place_with_its_mtime_restored(row: Row) -> None:
    folder = write_analysis(row.tmp / "analysis", slow={"*": 0.3, "node-2": 2.0})
    expected = simulated(folder, NODES, epochs=3)
    watcher = row.watch()
    federation = row.federation(folder, epochs=3, FLAME_EPOCH_TIMEOUT="300")
    federation.start_all()
    watcher.wait_for("node-2", "computing", 1, timeout=90)
    _rewrite_in_place_keeping_stat(folder / "data" / "node-2" / "values.csv")
    aggregator = federation.processes[AGGREGATOR]
    code = aggregator.wait(90)
    if code == 0:
        assert aggregator.value() == expected, "exit 0 with a result from changed data"
    else:
        assert "'values.csv' changed during the run" in aggregator.stderr(), aggregator.tail()


def _fingerprinted(tmp_path: Path, text: str) -> tuple[Path, DataVersions]:
    """tmp_path/d/values.csv holding `text`, and the data version taken of that folder."""
    folder = tmp_path / "d"
    folder.mkdir()
    target = folder / "values.csv"
    target.write_text(text)
    return target, DataVersions.take({"local": LocalSource(folder)})


def test_data_versions_unit_in_place_rewrite(tmp_path: Path) -> None:
    target, versions = _fingerprinted(tmp_path, "value\n1.25\n2.5\n")
    _rewrite_in_place_keeping_stat(target)
    with pytest.raises(DataError, match=r"'values\.csv' changed during the run"):
        versions.check()


def test_data_touched_without_change_is_a_loud_failure_not_silent(tmp_path: Path) -> None:
    """Touch only (content unchanged): a loud, named failure is safe (if strict); a pass is
    also safe. What must not happen is a crash without the file's name."""
    target, versions = _fingerprinted(tmp_path, "value\n1.25\n")
    info = os.stat(target)
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns + 5_000_000_000))
    try:
        versions.check()
    except DataError as exc:
        assert "'values.csv'" in str(exc)


def test_data_appended_in_place_fails_naming_it(tmp_path: Path) -> None:
    target, versions = _fingerprinted(tmp_path, "value\n1.25\n")
    info = os.stat(target)
    with target.open("a") as handle:
        handle.write("2.5\n")
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))  # even with the mtime put back
    with pytest.raises(DataError, match=r"'values\.csv' changed during the run"):
        versions.check()


# --- CSV: values in errors and logs ---------------------------------------------------------

SECRET = "Zebulon"


@pytest.mark.parametrize(
    "content",
    [
        f"a,b,c\n1,2,3\n{SECRET}\xe9,5\n".encode("latin-1"),  # ragged and undecodable
        f"a,b\n1,2\n3,4,{SECRET}\n".encode("utf-16"),  # ragged UTF-16
        f'a,b\n"x\n{SECRET}\xe9",1\n'.encode("latin-1"),  # bad byte in a quoted newline field
        b"\xff\xfe" + "a,b\n1,".encode("utf-16-le") + SECRET.encode("utf-16-le") + b"\x00\xd8",
    ],
    ids=["latin1-ragged", "utf16-ragged", "quoted-newline", "lone-surrogate"],
)
def test_csv_errors_never_carry_cell_values(tmp_path: Path, content: bytes) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "r.csv").write_bytes(content)
    with pytest.raises(DataError) as caught:
        Data({"local": LocalSource(folder)}).read_csv("r.csv")
    assert "'r.csv'" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_stray_text_warning_does_not_quote_the_cell(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "r.csv").write_text(f"a,b\n1,2\n{SECRET},3\n4,5\n")
    with caplog.at_level(logging.WARNING):
        Data({"local": LocalSource(folder)}).read_csv("r.csv")
    assert "text cell" in caplog.text
    assert SECRET not in caplog.text

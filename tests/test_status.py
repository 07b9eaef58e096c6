"""`flame status` and `flame.ops.status` during and after real multi-process runs.

An aggregator and two analysis nodes run as separate `flame run` processes against a real
MQTT broker, with results on a real S3 server; `flame status --watch` follows them as a
process of its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import Broker
from nodes import federation_env, flame_process, node_env
from servers.s3_server import S3Server

from flame.cli import main
from flame.config import FlameConfig
from flame.errors import RunTimeout
from flame.ops import status as st
from flame.wire.envelope import unpack

USERS = ("aggregator", "clinic-a", "clinic-b", "watcher")
NODES = ("clinic-a", "clinic-b")
EPOCHS = 3

ANALYSIS = textwrap.dedent(
    """
    import time

    import flame

    # Each step lasts longer than the status interval (0.25 s), so every state shows;
    # faster ones are sampled, the latest winning (flame.node.status_board).
    def analyze(data, epoch, previous):
        values = data.read_csv()["value"]
        time.sleep(0.6)
        flame.context().set_progress(0.5)
        time.sleep(0.6)
        if epoch == FAIL_AT and flame.context().node_id == "clinic-b":
            raise ValueError("no such column: weight")
        return {"n": int(values.size), "sum": float(values.sum()) + epoch}

    def aggregate(results, epoch, previous):
        return {
            "epoch": epoch,
            "n": sum(r["n"] for r in results.values()),
            "total": sum(r["sum"] for r in results.values()),
        }
    """
)


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with Broker(users=USERS) as running:
        yield running


@pytest.fixture(scope="module")
def s3(s3_server: S3Server) -> S3Server:
    """The session's S3 server (tests/servers/plugin.py)."""
    return s3_server


def _analysis(folder: Path, fail_at: int = -1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "analysis.py").write_text(f"FAIL_AT = {fail_at}\n" + ANALYSIS)
    for index, node in enumerate(NODES):
        data = folder / "data" / node
        data.mkdir(parents=True, exist_ok=True)
        rows = "\n".join(str(v) for v in range(index * 10, index * 10 + 5 + index))
        (data / "values.csv").write_text(f"value\n{rows}\n")
    return folder


def _env(
    broker: Broker, s3: S3Server, analysis_id: str, bucket: str, **extra: str
) -> dict[str, str]:
    return federation_env(
        broker,
        analysis_id,
        NODES,
        epochs=EPOCHS,
        storage=s3.settings(bucket=bucket),
        FLAME_LOG_FORMAT="json",
        **extra,
    )


def _as_operator(env: dict[str, str]) -> dict[str, str]:
    """The nodes' variables plus the operator's own broker user (ACL: may read statuses)."""
    return {**env, "FLAME_BROKER__USERNAME": "watcher"}


def _config(env: dict[str, str], **update: object) -> FlameConfig:
    """The operator's config: the same broker and storage, read from those variables."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(_as_operator(env))
        config = FlameConfig()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return config.model_copy(update=update) if update else config


def _flame(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return flame_process(args, env)


def _wait_for_line(stream: io.TextIOBase | object, needle: str, timeout: float) -> list[str]:
    """Lines read from `stream` until one contains `needle` (bounded by `timeout`)."""
    seen: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in stream:  # type: ignore[attr-defined]
            seen.append(line)
            if needle in line:
                break
        found.set()  # the line, or the end of the stream (the process exited)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    found.wait(timeout)
    assert any(needle in line for line in seen), f"no {needle!r} within {timeout} s: {seen}"
    return seen


def _run_federation(env: dict[str, str], folder: Path) -> dict[str, subprocess.Popen[str]]:
    return {
        node: _flame(
            ["run", str(folder)],
            node_env(env, node, data_dir=None if node == "aggregator" else folder / "data" / node),
        )
        for node in ("aggregator", *NODES)
    }


def _finish(processes: dict[str, subprocess.Popen[str]], timeout: float = 120) -> dict[str, str]:
    outputs: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    try:
        for name, process in processes.items():
            out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs[name] = out
            outputs[f"{name}.err"] = err
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)
    return outputs


@pytest.fixture(scope="module")
def finished_run(
    broker: Broker, s3: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    """One real 3-process run, watched by `flame status --watch` from its very start."""
    folder = _analysis(tmp_path_factory.mktemp("status") / "analysis")
    env = _env(broker, s3, "status-run", "flame-status")
    watcher = _flame(["status", "status-run", "--watch", "--timeout", "120"], _as_operator(env))
    assert watcher.stderr is not None
    _wait_for_line(watcher.stderr, "watching analysis status-run", 30)
    processes = _run_federation(env, folder)
    outputs = _finish(processes)
    try:
        watch_out, watch_err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(10)
    return {
        "env": env,
        "folder": folder,
        "outputs": outputs,
        "codes": {name: p.returncode for name, p in processes.items()},
        "watch": watch_out.splitlines(),
        "watch_err": watch_err,
        "watch_code": watcher.returncode,
    }


def _messages(lines: list[str]) -> list[str]:
    clock = re.compile(r"^\d\d:\d\d:\d\d ")
    return [line[9:] for line in lines if clock.match(line)]  # the live lines, without clock


def test_watch_shows_every_state_change_of_every_node(finished_run: dict[str, object]) -> None:
    codes = finished_run["codes"]
    outputs = finished_run["outputs"]
    assert codes == {"aggregator": 0, "clinic-a": 0, "clinic-b": 0}, outputs
    assert finished_run["watch_code"] == 0, finished_run["watch_err"]
    watched = _messages(finished_run["watch"])  # type: ignore[arg-type]
    for node in NODES:
        mine = [
            m.split(": ", 1)[1]
            for m in watched
            if m.startswith(f"{node}: ") and not m.endswith("(50%)")  # progress: its own test
        ]
        expected = ["waiting"]
        for epoch in range(EPOCHS):
            expected += [f"computing epoch {epoch} (0%)", f"sent epoch {epoch}"]
        expected += [f"done epoch {EPOCHS - 1}"]
        assert mine[: len(expected)] == expected, (node, watched)
        assert mine[len(expected) :] in ([], ["offline"]), (node, watched)  # it may leave first
    aggregator = [
        m.split(": ", 1)[1] for m in watched if m.startswith("aggregator (aggregation): ")
    ]
    assert aggregator == [
        "waiting",
        *(f"collecting epoch {e}" for e in range(EPOCHS)),
        f"done epoch {EPOCHS - 1}",
    ]
    epochs = [m for m in watched if m.startswith("epoch ")]
    assert [e.split(":")[0] for e in epochs] == [f"epoch {e}" for e in range(EPOCHS)]
    for line in epochs:
        assert "2/2 answered (clinic-a, clinic-b)" in line and line.endswith(" s")
    assert "run finished" in watched
    # after the live lines, the summary with the final result's location
    assert any(
        m.startswith("s3://flame-status/status-run/final/result.bin")
        for m in [line.strip() for line in finished_run["watch"]]
    )  # type: ignore[union-attr]


def test_watch_shows_the_progress_analyze_sets(finished_run: dict[str, object]) -> None:
    watched = _messages(finished_run["watch"])  # type: ignore[arg-type]
    for node in NODES:
        for epoch in range(EPOCHS):
            assert f"{node}: computing epoch {epoch} (50%)" in watched


def test_status_after_the_run_and_verified_download(
    finished_run: dict[str, object], tmp_path: Path, s3: S3Server
) -> None:
    env = finished_run["env"]
    assert isinstance(env, dict)
    shown = subprocess.run(
        [sys.executable, "-m", "flame", "status", "status-run"],
        env=_as_operator(env), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"analysis status-run: finished after {EPOCHS} epochs"
    assert sum(line.startswith("  epoch ") for line in lines) == EPOCHS
    assert "  s3://flame-status/status-run/final/result.bin" in "\n".join(lines)

    as_json = subprocess.run(
        [sys.executable, "-m", "flame", "status", "status-run", "--json"],
        env=_as_operator(env), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    document = json.loads(as_json.stdout)
    assert document["state"] == "finished" and len(document["history"]) == EPOCHS
    assert document["final"]["location"] == "s3://flame-status/status-run/final/result.bin"

    target = tmp_path / "result.bin"
    fetched = subprocess.run(
        [sys.executable, "-m", "flame", "status", "status-run", "--download", str(target)],
        env=_as_operator(env), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    data = target.read_bytes()
    manifest = json.loads(
        s3.client().get_object("flame-status", "status-run/final/manifest.json").read()
    )
    assert hashlib.sha256(data).hexdigest() == manifest["result"]["sha256"]
    assert f"sha256 {manifest['result']['sha256']} verified" in fetched.stderr
    outputs = finished_run["outputs"]
    assert isinstance(outputs, dict)
    assert unpack(data) == json.loads(outputs["aggregator"])


def test_python_client_reads_the_same(finished_run: dict[str, object]) -> None:
    env = finished_run["env"]
    assert isinstance(env, dict)
    run = st.get("status-run", _config(env))
    assert run.state == "finished"
    assert run.epochs == EPOCHS and [r.epoch for r in run.history] == list(range(EPOCHS))
    assert all(r.nodes == list(NODES) and r.missing == [] for r in run.history)
    assert run.final is not None and run.final.location.startswith("s3://flame-status/")
    assert set(run.nodes) == {"aggregator", *NODES}  # offline now, but still listed
    assert json.loads(json.dumps(run.to_dict()))["state"] == "finished"
    client = st.StatusClient(_config(env))
    assert client.result("status-run")["epoch"] == EPOCHS - 1


def test_a_tampered_result_is_refused(
    finished_run: dict[str, object],
    tmp_path: Path,
    s3: S3Server,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = finished_run["env"]
    assert isinstance(env, dict)
    client = s3.client()
    bucket, key = "flame-tamper", "tampered/final/result.bin"
    client.make_bucket(bucket)
    original = client.get_object("flame-status", "status-run/final/result.bin").read()
    stat = client.stat_object("flame-status", "status-run/final/result.bin")
    digest = stat.metadata["x-amz-meta-flame-sha256"]
    forged = original.replace(b"total", b"tota1")
    client.put_object(bucket, key, io.BytesIO(forged), len(forged),
                      metadata={"flame-sha256": digest})  # fmt: skip
    config = _config(env)
    config = config.model_copy(
        update={"storage": config.storage.model_copy(update={"bucket": bucket})}
    )
    target = tmp_path / "r.bin"
    # with the roster: no manifest signed by the aggregator names these bytes: not offered
    with pytest.raises(Exception, match="no final result"):
        st.StatusClient(config).download("tampered", target)
    # without one (an unsigned run): the bytes' SHA-256 is checked against their metadata
    config = config.model_copy(update={"roster": None})
    with pytest.raises(Exception, match="SHA-256") as caught:
        st.StatusClient(config).download("tampered", target)
    assert "Integrity" in type(caught.value).__name__
    assert not target.exists()
    assert not list(tmp_path.iterdir())


def test_watch_reports_a_failing_node_and_exits_1(
    broker: Broker, s3: S3Server, tmp_path: Path
) -> None:
    folder = _analysis(tmp_path / "analysis", fail_at=1)
    env = _env(broker, s3, "status-fail", "flame-status-fail")
    watcher = _flame(["status", "status-fail", "--watch", "--timeout", "120"], _as_operator(env))
    assert watcher.stderr is not None
    _wait_for_line(watcher.stderr, "watching analysis", 30)
    outputs = _finish(_run_federation(env, folder))
    try:
        out, _ = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(10)
    assert watcher.returncode == 1, out
    watched = _messages(out.splitlines())
    # statuses (every roster member reads them) name the exception type, not its message
    assert "clinic-b: failed in epoch 1: ValueError (details: the logs)" in watched, watched
    assert not any("no such column" in m for m in watched), watched
    assert any(
        m.startswith("aggregator (aggregation): failed in epoch 1: node 'clinic-b' failed")
        for m in watched
    ), watched
    assert "run failed" in watched
    assert "analysis status-fail: failed" in out.splitlines()  # the summary after the live lines
    assert "no such column" in outputs["aggregator.err"]
    shown = _flame(["status", "status-fail"], _as_operator(env)).communicate(timeout=60)[0]
    assert "the failure: node 'clinic-b' failed in epoch 1: ValueError: no such column" in shown


def test_watch_gives_up_at_its_timeout(broker: Broker, s3: S3Server) -> None:
    env = _env(broker, s3, "never-started", "flame-none")
    client = st.StatusClient(_config(env), timeout=3)
    started = time.monotonic()
    with pytest.raises(RunTimeout, match=r"did not finish within 1\.5 s"):
        for change in client.watch("never-started", timeout=1.5):
            assert change.kind == "watching"
    assert time.monotonic() - started < 10


def test_status_needs_a_broker_or_storage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("FLAME_"):
            monkeypatch.delenv(name)
    assert main(["status", "anything"]) == 1
    assert "nothing to ask" in capsys.readouterr().err


def test_an_unreachable_broker_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from servers.s3_server import free_port

    for name in list(os.environ):
        if name.startswith("FLAME_"):
            monkeypatch.delenv(name)
    port = free_port()
    monkeypatch.setenv("FLAME_BROKER__URL", f"mqtt://127.0.0.1:{port}")
    assert main(["status", "x"]) == 1
    out = capsys.readouterr().out
    assert "! broker: connection refused \u2014 check FLAME_BROKER__URL" in out


# ------------------------------------------------------------------------ parsing, rendering


def test_statuses_from_the_wire_are_validated() -> None:
    assert st._parse_status("n", b"") is None
    assert st._parse_status("n", b"not json") is None
    assert st._parse_status("n", b"[1, 2]") is None
    assert st._parse_status("n", b'{"state": 3}') is None
    assert st._parse_status("n", b"{" * 100_000) is None
    status = st._parse_status(
        "n", b'{"state":"computing","epoch":2,"progress":0.4,"role":"analysis","extra":1}'
    )
    assert status is not None
    assert status.describe() == "computing epoch 2 (40%)"
    assert status.extra == {"extra": 1}
    offline = st._parse_status("n", b'{"state":"offline"}')
    assert offline is not None and offline.describe() == "offline"
    gone = st._parse_status("n", b'{"state":"offline","last_state":"done"}')
    assert gone is not None and gone.describe() == "offline (last: done)"


def test_rendering_a_run() -> None:
    run = st.RunStatus(
        "a1",
        nodes={
            "n1": st.NodeStatus("n1", "failed", "analysis", 1, 0.0, reason="ValueError: x"),
            "agg": st.NodeStatus("agg", "failed", "aggregation", 1, 0.0),
        },
        history=[st.EpochInfo(0, ["n1"], ["n2"], 0.0, 1.5)],
    )
    lines = st.render_status(run)
    assert lines[0] == "analysis a1: failed"
    assert lines[2].split()[:3] == ["agg", "aggregation", "failed"]
    assert "n1" in lines[3] and "failed in epoch 1: ValueError: x" in lines[3]
    assert lines[5].startswith("  epoch 0: 1/2 answered (n1), missing n2")
    assert lines[5].endswith("1.500 s")

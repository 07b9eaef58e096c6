"""Isolated simulation through the fork server (issue 23 item 2): what the pool must keep.

Each node's `analyze` runs in a child forked per epoch from one confined server, a few at a
time. The sandbox must hold for them as for a spawned child per node: a node cannot read
another node's scratch files (even with the path, while both run, forked from the same
server), module globals and scratch do not carry over between nodes or epochs, and 1,000
nodes finish with a handful of processes rather than 1,000."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import flame

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")

SNOOP = """\
import os
import flame

SEEN = []  # module state: must start empty on every node and every epoch

def analyze(data, epoch, previous):
    ctx = flame.context()
    SEEN.append(ctx.node_id)
    with open("secret.txt", "w") as handle:  # in this call's scratch folder (the cwd)
        handle.write("secret of " + ctx.node_id)
    mine = previous["paths"][ctx.node_id] if previous else None
    peers = [p for p in ctx.participants if p != ctx.node_id]
    ctx.send("where", os.getcwd(), to=peers)  # both nodes' children live while they wait
    got = ctx.receive("where", senders=peers, timeout=120)
    stolen = []
    for path in [*got.messages.values(), *([mine] if mine else [])]:
        try:
            with open(os.path.join(path, "secret.txt")) as handle:
                stolen.append(handle.read())
        except OSError as exc:
            stolen.append(type(exc).__name__)
    with open("/proc/self/stat") as stat:  # as the host sees them (a PID namespace or not)
        text = stat.read()
    pid, ppid = int(text.split(" ", 1)[0]), int(text.rsplit(")", 1)[1].split()[1])
    try:  # the server's memory map: another process, outside this child's domain
        with open(f"/proc/{ppid}/maps") as handle:
            server = "read " + handle.read(20)
    except OSError as exc:
        server = type(exc).__name__
    return {"seen": ",".join(SEEN), "cwd": os.getcwd(), "server": ppid,
            "pid": pid, "stolen": ",".join(stolen), "server_maps": server}

def aggregate(results, epoch, previous):
    return {"paths": {n: r["cwd"] for n, r in results.items()},
            "runs": (previous or {}).get("runs", []) + [dict(results)]}
"""


def test_pooled_nodes_see_neither_each_others_scratch_nor_globals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flame.isolation import forkserver

    monkeypatch.setenv(forkserver.WORKERS_ENV, "1")  # one slot: the children take turns
    forkserver.reset_slots()
    (tmp_path / "snoop.py").write_text(SNOOP)
    monkeypatch.syspath_prepend(str(tmp_path))
    import snoop

    try:
        result = flame.simulate(
            snoop.analyze,
            snoop.aggregate,
            data={"a": {"x.csv": "v\n1\n"}, "b": {"x.csv": "v\n2\n"}},
            epochs=2,
            isolate=True,
        )
    finally:
        forkserver.reset_slots()
    runs = result.value["runs"]
    assert len(runs) == 2
    from flame.isolation.forkserver import _servers

    assert any(str(tmp_path) in server.readable for server in _servers)  # a server served
    assert os.getpid() not in {r["server"] for run in runs for r in run.values()}
    pids = [r["pid"] for run in runs for r in run.values()]
    assert len(set(pids)) == 4  # a fresh child per node and epoch
    for epoch, run in enumerate(runs):
        for node, r in run.items():
            assert r["seen"] == node, (epoch, node, r)  # the analysis imported afresh
            assert "secret of" not in r["stolen"], (epoch, node, r)
            assert not r["server_maps"].startswith("read"), (epoch, node, r)
            expected = 1 if epoch == 0 else 2  # the peer's scratch; in epoch 1 also its own old one
            assert len(r["stolen"].split(",")) == expected
    assert not snoop.SEEN  # nothing ran in this process
    cwds = [r["cwd"] for run in runs for r in run.values()]
    assert len(set(cwds)) == 4 and not any(os.path.exists(c) for c in cwds)  # removed


ANALYSIS = """\
def analyze(data):
    rows = list(data.rows("x.csv"))
    return {"n": len(rows), "total": sum(float(r["v"]) for r in rows)}

def aggregate(results):
    return {"n": sum(r["n"] for r in results.values()),
            "total": sum(r["total"] for r in results.values())}
"""


def _descendants(root: int) -> int:
    """How many processes descend from `root` now (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    count, todo = 0, [root]
    while todo:
        found = children.get(todo.pop(), [])
        count += len(found)
        todo += found
    return count


@pytest.mark.timeout(900)
def test_a_thousand_isolated_nodes_finish_with_a_few_processes(tmp_path: Path) -> None:
    nodes = 1000
    for i in range(nodes):
        folder = tmp_path / "data" / f"n{i:04d}"
        folder.mkdir(parents=True)
        (folder / "x.csv").write_text(f"v\n{i}\n")
    (tmp_path / "analysis.py").write_text(ANALYSIS)
    env = {**os.environ, "FLAME_SIMULATE_WORKERS": "2", "FLAME_EPOCH_TIMEOUT": "600"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flame",
            "simulate",
            "analysis.py",
            "--data",
            "data",
            "--quiet",
            "--output",
            "out.json",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _descendants(process.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _out, err = process.communicate(timeout=840)
    finally:
        stop.set()
        process.kill()
    watcher.join()
    assert process.returncode == 0, err[-3000:]
    value = json.loads((tmp_path / "out.json").read_text())["result"]
    assert value == {"n": nodes, "total": float(sum(range(nodes)))}, value
    # the server and at most two computing children (each PID 1 of its own PID namespace),
    # plus ones still exiting: not one per node
    assert 1 <= peak <= 12, peak


def test_the_server_warms_installed_libraries_never_the_analysis_own_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the server imports before forking is in every child's memory: only the stdlib
    and site-packages, never a module of the analysis folder (even when it is on the path)."""
    from flame.isolation.forkserver import top_imports

    (tmp_path / "helpers.py").write_text("SHARED = []\n")
    (tmp_path / "analysis.py").write_text(
        "import numpy\nimport json, helpers\nfrom helpers import SHARED\nimport not_installed_x\n"
        "from . import sibling\nimport flame\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert top_imports(str(tmp_path / "analysis.py")) == ["numpy", "json"]
    assert top_imports(str(tmp_path)) == ["numpy", "json"]  # a folder: its analysis.py


SPEND_SWAP = """\
import os
import flame

def analyze(data):
    flame.context().save("ran", 1)  # a request to the runtime: must never be served
    return 1

if os.environ.get("FLAME_ANALYSIS_CHILD") == "1":  # what the child loads differs
    analyze.__flame_spend__ = {"epsilon": 0.0, "delta": 0.0}
"""


class _State:
    def __init__(self) -> None:
        self.saved: dict[str, object] = {}

    def save(self, tag: str, value: object) -> None:
        self.saved[tag] = value

    def load(self, tag: str, default: object = None) -> object:
        return self.saved.get(tag, default)


def test_a_pooled_child_declaring_another_spend_is_stopped_before_any_request_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The "load" and "analyze" requests go to a forked child together; its declared spend is
    still checked before the runtime serves any of its requests."""
    from flame.data import Data
    from flame.errors import AnalysisError
    from flame.isolation.forkserver import supported
    from flame.isolation.pooled import PooledRunner
    from flame.node.context import Context

    if not supported():
        pytest.skip("no fork server on this platform")
    (tmp_path / "spend_swap.py").write_text(SPEND_SWAP)
    monkeypatch.syspath_prepend(str(tmp_path))
    import spend_swap

    state = _State()
    context = Context(
        analysis_id="pool",
        node_id="n",
        role="analysis",
        participants=["n"],
        aggregator_id="agg",
        mailbox=None,  # type: ignore[arg-type]
        state=state,  # type: ignore[arg-type]
    )
    runner = PooledRunner(spend_swap.analyze, Data({}), context)
    with pytest.raises(AnalysisError, match="declares another privacy spend"):
        runner.run(0, None)
    assert state.saved == {}
    assert runner._process is None and runner._channel is None  # stopped, not left running


def test_the_server_warms_secure_fields_only_for_an_analysis_that_mentions_them(
    tmp_path: Path,
) -> None:
    """flame.secure.fields brings flame's settings and pydantic into the server (and so into
    every fork): only where the analysis's files name `secure` or `Results`."""
    from flame.isolation.forkserver import SECURE_FIELDS, warm_for

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "analysis.py").write_text("def analyze(data):\n    return 1\n")
    assert SECURE_FIELDS not in warm_for(str(plain / "analysis.py"))
    assert SECURE_FIELDS not in warm_for(str(plain))
    (plain / "helper.py").write_text("import flame\n\ndef total(x):\n    return flame.secure(x)\n")
    assert SECURE_FIELDS in warm_for(str(plain))  # a folder: any of its files
    assert SECURE_FIELDS not in warm_for(str(plain / "analysis.py"))
    (tmp_path / "typed.py").write_text("from flame import Results\n")
    assert SECURE_FIELDS in warm_for(str(tmp_path / "typed.py"))

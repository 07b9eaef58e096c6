"""Issue 20 in a real isolated child: the runtime's own state (threshold guard ledger) is out
of the analysis's reach, every file request takes the same hidden-path check, and a hostile
analysis can write nothing on its import path or in any folder the runtime reads."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import site
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import flame
from flame.aggregator.run_store import NodeState
from flame.clients.file_store import FileStore
from flame.clients.object_store import AnalysisLayout
from flame.data import Data, LocalSource
from flame.isolation.runner import ChildRunner
from flame.node.context import Context
from flame.secure.guard import GuardLedger
from flame.wire.envelope import unpack


def _context(state: Any = None) -> Context:
    return Context(
        analysis_id="sandbox",
        node_id="n",
        role="analysis",
        participants=["n"],
        aggregator_id="agg",
        mailbox=None,  # type: ignore[arg-type]
        state=state,
    )


def _attempt(fn: Any) -> Any:
    try:
        return {"ok": True, "value": fn()}
    except Exception as exc:  # what stopped the analysis
        return {"ok": False, "error": type(exc).__name__, "message": str(exc)[:200]}


# --- hole 3: the guard ledger -----------------------------------------------------------------


def guard_thief(data: Any, epoch: int = 0, previous: Any = None) -> Any:
    ctx = flame.context()
    tries: dict[str, Any] = {}
    for tag in ("flame-threshold-guard", "FLAME-threshold-guard", "flame.anything"):
        tries[f"load {tag}"] = _attempt(lambda tag=tag: ctx.load(tag))
        tries[f"save {tag}"] = _attempt(lambda tag=tag: ctx.save(tag, {"body": "junk"}))
    ctx.save("mine", 7)
    tries["own tag"] = ctx.load("mine")
    return {"tries": json.dumps(tries, default=str)}


def test_the_analysis_cannot_read_or_overwrite_the_threshold_guard_ledger(tmp_path: Path) -> None:
    state = NodeState(FileStore(tmp_path), "sandbox", "n")
    share = SimpleNamespace(secret=123456789, node_id="n", index=1)
    ledger = GuardLedger(share, state)  # type: ignore[arg-type]
    ledger._load()
    ledger._fixed = {"a": {"sum": ["n", "m"]}}
    ledger._save()
    stored = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    before = {p: (tmp_path / p).read_bytes() for p in stored}

    runner = ChildRunner(guard_thief, Data({}), _context(state))
    try:
        tries = json.loads(runner.run(0, None).result["tries"])
    finally:
        runner.close()
    for what, outcome in tries.items():
        if what == "own tag":
            assert outcome == 7
            continue
        assert outcome["ok"] is False, (what, outcome)
        assert "reserved" in outcome["message"]
    assert {p: (tmp_path / p).read_bytes() for p in stored} == before
    # the ledger is the runtime's own state, beside (not in) the analysis's
    assert any("/runtime/" in p for p in stored) and not any("/state/" in p for p in stored)
    again = GuardLedger(share, NodeState(FileStore(tmp_path), "sandbox", "n"))  # type: ignore[arg-type]
    again._load()  # a restarted holder still knows its fixed set (HMAC checked)
    assert again.fixed_sets("a") == {"sum": ("n", "m")}
    layout = AnalysisLayout("sandbox")
    assert unpack(FileStore(tmp_path).get_bytes(layout.node_state("n", "mine"))) == 7


# --- hole 4: one path check for every request ----------------------------------------------


def symlink_reader(data: Any, epoch: int = 0, previous: Any = None) -> Any:
    rpc = next(o for o in gc.get_objects() if type(o).__name__ == "_Rpc")
    tries = {
        "read": _attempt(lambda: rpc.call("read", source="node", name="leak.csv")),
        "open": _attempt(lambda: rpc.descriptor("node", "leak.csv")),
        "files": _attempt(lambda: rpc.call("files", source="node")),
        "read_csv": _attempt(lambda: data.read_csv("leak.csv").keys()),
    }
    return {"tries": json.dumps(tries, default=lambda b: bytes(b).hex())}


def test_a_data_folder_symlink_into_a_hidden_path_is_refused_for_every_request(
    tmp_path: Path,
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "token").write_text("tok\nSECRET-TOKEN-VALUE\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.csv").write_text("v\n1\n")
    (data / "leak.csv").symlink_to(secrets / "token")
    runner = ChildRunner(
        symlink_reader,
        Data({"node": LocalSource(data, "node")}),
        _context(),
        hide=[secrets, data],
    )
    try:
        tries = json.loads(runner.run(0, None).result["tries"])
    finally:
        runner.close()
    wire = json.dumps(tries)
    assert "SECRET-TOKEN-VALUE" not in wire
    assert b"SECRET-TOKEN-VALUE".hex() not in wire
    for kind in ("read", "open", "read_csv"):
        assert tries[kind]["ok"] is False, (kind, tries[kind])
        assert "hidden" in tries[kind]["message"], tries[kind]
    assert tries["files"] == {"ok": True, "value": ["x.csv"]}


# --- the sweep: nothing on the import path or in the runtime's folders is writable -----------


def sweeper(data: Any, epoch: int = 0, previous: Any = None) -> Any:
    """Tries every kind of write, harmlessly: what it creates it removes at once, appends
    nothing, and sets modes and times to what they are (so a broken sandbox, e.g. on a
    machine without Landlock, fails this test without damaging the installation)."""
    import tempfile

    targets = json.loads(flame.context().params["targets"])
    wrote: list[str] = []
    mine = f"zz_flame_sweep_{os.getpid()}"

    def create(folder: str, suffix: str) -> None:
        path = os.path.join(folder, mine + suffix)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.remove(path)

    def make_dir(folder: str) -> None:
        os.mkdir(os.path.join(folder, mine))
        os.rmdir(os.path.join(folder, mine))

    def same_mode(path: Path) -> None:
        os.chmod(path, os.stat(path).st_mode & 0o7777)

    def same_times(path: Path) -> None:
        info = os.stat(path)
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))

    for folder in targets:
        attempts = [
            ("create .py", lambda f=folder: create(f, ".py")),
            ("create .pth", lambda f=folder: create(f, ".pth")),
            ("mkdir", lambda f=folder: make_dir(f)),
        ]
        for file in sorted(Path(folder).glob("*.py"))[:3]:
            attempts.append(("open for append", lambda p=file: open(p, "ab").close()))
            attempts.append(("chmod", lambda p=file: same_mode(p)))
            attempts.append(("utime", lambda p=file: same_times(p)))
        for what, attempt in attempts:
            try:
                attempt()
                wrote.append(f"{what} {folder}")
            except OSError:
                pass
    scratch = tempfile.gettempdir()
    Path(scratch, "mine.txt").write_text("scratch is writable")
    return {"wrote": json.dumps(wrote), "scratch": scratch}


def _import_folders() -> list[str]:
    flame_dir = Path(flame.__file__).resolve().parent
    folders = {str(flame_dir), str(flame_dir / "data"), str(flame_dir / "isolation")}
    folders |= {p for k, p in sysconfig.get_paths().items() if "lib" in k}
    folders |= {p for p in sys.path if p}
    folders |= set(site.getsitepackages())
    return sorted(f for f in folders if os.path.isdir(f))


def _fingerprint(folders: list[str]) -> dict[str, str]:
    seen: dict[str, str] = {}
    for folder in folders:
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            info = os.lstat(path)
            digest = ""
            if entry.endswith(".py") and os.path.isfile(path):
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            seen[path] = f"{info.st_mtime_ns}:{info.st_size}:{digest}"
    return seen


def test_a_hostile_analysis_writes_nothing_on_the_import_path_or_the_runtimes_folders(
    tmp_path: Path,
) -> None:
    node = tmp_path / "node"
    data, state, secrets = node / "data", node / "state", node / "secrets"
    for folder in (data, state, secrets):
        folder.mkdir(parents=True)
    (data / "x.csv").write_text("v\n1\n")
    (secrets / "policy.toml").write_text("min_rows = 1\n")
    runtime_folders = [str(data), str(state), str(secrets), str(node), str(tmp_path)]
    targets = _import_folders() + runtime_folders
    before = _fingerprint(targets)
    context = _context(NodeState(FileStore(state), "sandbox", "n"))
    context.params = {"targets": json.dumps(targets)}
    runner = ChildRunner(
        sweeper,
        Data({"node": LocalSource(data, "node")}),
        context,
        hide=[data, state, secrets],
    )
    try:
        result = runner.run(0, None).result
        scratch = result["scratch"]
        assert Path(scratch, "mine.txt").is_file()  # its one writable folder, while it runs
    finally:
        runner.close()
    assert json.loads(result["wrote"]) == []
    assert _fingerprint(targets) == before
    assert not os.path.exists(scratch)  # emptied (removed) after the run

"""Red team of issue 20 (the analysis sandbox as an allow-list), from the seat of a HOSTILE
APPROVED ANALYSIS running in a real isolated child (`ChildRunner`, Landlock + seccomp + user
and network namespaces). Each test asserts the SAFE outcome; an attack that currently gets
through is kept as `xfail(strict=True, reason="open: ...")`.

Nothing here damages the machine when a defence fails: writes go to files the test created
(or are create-then-remove probes), signals are harmless (0 / SIGCONT), ptrace uses SEIZE on
a process we own, and every process an attack leaves behind is killed by pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from broker import have_mosquitto
from redteam_harness import one_node_federation

import flame
from flame.aggregator.run_store import NodeState
from flame.clients.file_store import FileStore
from flame.data import Data, LocalSource
from flame.errors import AnalysisError, AnalysisLoadError
from flame.isolation.runner import AnalysisAt, ChildRunner
from flame.node.context import Context

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")

needs_mosquitto = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")

SECRET = "RT-SECRET-9f1c2e"


def _context(state: Any = None, **params: Any) -> Context:
    ctx = Context(
        analysis_id="redteam",
        node_id="n",
        role="analysis",
        participants=["n"],
        aggregator_id="agg",
        mailbox=None,  # type: ignore[arg-type]
        state=state,
    )
    ctx.params = dict(params)
    return ctx


def _try(fn: Any) -> dict[str, Any]:
    try:
        value = fn()
    except BaseException as exc:  # what stopped the attack
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return {"ok": True, "value": str(value)[:300]}


def _node(tmp_path: Path) -> dict[str, Path]:
    """A node's folders: data (hidden, served by descriptor), state, secrets (key/token)."""
    node = tmp_path / "node"
    paths = {k: node / k for k in ("data", "state", "secrets")}
    for folder in paths.values():
        folder.mkdir(parents=True)
    (paths["data"] / "x.csv").write_text("v,name\n1,patient0\n2,patient1\n")
    (paths["secrets"] / "identity.key").write_text(f"-----KEY {SECRET}-----\n")
    paths["key"] = paths["secrets"] / "identity.key"
    return paths


def _run(analysis: Any, ctx: Context, paths: dict[str, Path] | None = None) -> dict[str, Any]:
    sources = {} if paths is None else {"node": LocalSource(paths["data"], "node")}
    hide = [] if paths is None else [paths["data"], paths["state"], paths["secrets"]]
    runner = ChildRunner(analysis, Data(sources), ctx, hide=hide)
    try:
        result = runner.run(0, None).result
    finally:
        runner.close()
    assert isinstance(result, dict)
    return {k: json.loads(v) if k == "tries" else v for k, v in result.items()}


# --- 1. writes anywhere but the scratch folder ----------------------------------------------


def escape_writer(data: Any, epoch: int = 0, previous: Any = None) -> Any:
    """Create-then-remove probes in every folder the runtime or another user reads, plus the
    data file through its passed descriptor (re-opened for writing via /proc/self/fd)."""
    import tempfile

    params = flame.context().params
    tries: dict[str, Any] = {}
    mine = f"rt_probe_{os.getpid()}"

    def create(folder: str) -> str:
        path = os.path.join(folder, mine)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.remove(path)
        return path

    for folder in json.loads(params["folders"]):
        tries[f"create in {folder}"] = _try(lambda f=folder: create(f))
    rpc = next(o for o in gc.get_objects() if type(o).__name__ == "_Rpc")
    fd = rpc.descriptor("node", "x.csv")
    tries["write passed fd"] = _try(lambda: os.write(fd, b""))
    tries["reopen passed fd for append"] = _try(
        lambda: os.close(os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_APPEND))
    )
    scratch = tempfile.gettempdir()
    key = params["key"]
    tries["hardlink key into scratch"] = _try(lambda: os.link(key, os.path.join(scratch, "k")))
    tries["hardlink data into scratch"] = _try(
        lambda: os.link(f"/proc/self/fd/{fd}", os.path.join(scratch, "d"), follow_symlinks=True)
    )

    def symlink_read() -> bytes:
        os.symlink(key, os.path.join(scratch, "s"))
        with open(os.path.join(scratch, "s"), "rb") as stream:
            return stream.read()

    tries["symlink key from scratch"] = _try(symlink_read)
    tries["rename scratch out"] = _try(
        lambda: os.rename(scratch, os.path.join(os.path.dirname(scratch), mine))
    )
    tries["mkfifo in scratch"] = _try(lambda: os.mkfifo(os.path.join(scratch, "fifo")))
    tries["bind unix socket in scratch"] = _try(
        lambda: __import__("socket").socket(1).bind(os.path.join(scratch, "sock"))
    )
    os.close(fd)
    return {"tries": json.dumps(tries), "scratch": scratch}


def test_a_hostile_analysis_writes_nowhere_but_its_scratch(tmp_path: Path) -> None:
    paths = _node(tmp_path)
    home = os.path.expanduser("~")
    folders = [
        "/tmp",
        "/var/tmp",
        "/dev/shm",
        home,
        os.path.join(home, ".local"),
        os.getcwd(),
        str(Path(flame.__file__).resolve().parent),
        str(paths["data"]),
        str(paths["state"]),
        str(paths["secrets"]),
        str(tmp_path),
        "/etc",
        "/run",
    ]
    folders = [f for f in folders if os.path.isdir(f)]
    before = {f: sorted(os.listdir(f)) for f in folders}
    data_before = (paths["data"] / "x.csv").read_bytes()
    ctx = _context(folders=json.dumps(folders), key=str(paths["key"]))
    result = _run(escape_writer, ctx, paths)
    tries = result["tries"]
    leaked = {k: v for k, v in tries.items() if v["ok"]}
    assert leaked == {}, leaked
    assert SECRET not in json.dumps(tries)
    assert (paths["data"] / "x.csv").read_bytes() == data_before
    assert {f: sorted(os.listdir(f)) for f in folders if f != "/tmp"} == {
        f: v for f, v in before.items() if f != "/tmp"
    }
    assert not os.path.exists(result["scratch"])


# --- 2. reading the runtime: /proc of the parent, descriptors, ptrace, signals ---------------

_PTRACE_SEIZE, _PTRACE_DETACH = 0x4206, 17
_SYS_PIDFD_OPEN, _SYS_PIDFD_GETFD, _SYS_PIDFD_SEND_SIGNAL = 434, 438, 424
_SYS_PROCESS_VM_READV = 310


def parent_reader(data: Any, epoch: int = 0, previous: Any = None) -> Any:
    params = flame.context().params
    # the runtime's pid as this machine sees it: in its own PID namespace the child's
    # getppid() is 0 (its parent is outside), which would make kill(ppid) hit its own group
    ppid = int(params["runtime"])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.ptrace.restype = ctypes.c_long
    tries: dict[str, Any] = {}

    def read(path: str) -> bytes:
        with open(path, "rb") as stream:
            return stream.read(4096)

    for name in ("environ", "mem", "cmdline", "maps", "status", "cwd/x", "root/etc/hostname"):
        tries[f"/proc/ppid/{name}"] = _try(lambda n=name: read(f"/proc/{ppid}/{n}"))
    tries["list /proc/ppid/fd"] = _try(lambda: os.listdir(f"/proc/{ppid}/fd"))
    tries["/proc/self/../ppid/environ"] = _try(lambda: read(f"/proc/self/../{ppid}/environ"))
    tries["/proc/1/environ"] = _try(lambda: read("/proc/1/environ"))
    tries["/proc/self/root + key"] = _try(lambda: read("/proc/self/root" + params["key"]))
    tries["key by path"] = _try(lambda: read(params["key"]))
    tries["list /proc"] = _try(lambda: [p for p in os.listdir("/proc") if p.isdigit()][:3])

    def errno_of(rc: int) -> str:
        if rc == -1:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return str(rc)

    def seize() -> str:
        rc = libc.ptrace(_PTRACE_SEIZE, ppid, None, None)
        if rc == 0:
            libc.ptrace(_PTRACE_DETACH, ppid, None, None)
        return errno_of(rc)

    tries["ptrace seize parent"] = _try(seize)
    tries["kill(ppid, 0)"] = _try(lambda: os.kill(ppid, 0))
    tries["kill(ppid, SIGCONT)"] = _try(lambda: os.kill(ppid, signal.SIGCONT))
    # the child shares the runtime's process group: these succeed (the child itself is
    # in it) but must not reach the runtime (its SIGWINCH handler counts)
    tries["group: killpg(parent group, SIGWINCH)"] = _try(
        lambda: os.killpg(os.getpgid(ppid), signal.SIGWINCH)
    )
    tries["group: kill(0, SIGWINCH)"] = _try(lambda: os.kill(0, signal.SIGWINCH))

    def pidfd_getfd() -> str:
        pidfd = libc.syscall(_SYS_PIDFD_OPEN, ppid, 0)
        errno_of(pidfd)
        try:
            signalled = libc.syscall(_SYS_PIDFD_SEND_SIGNAL, pidfd, 0, None, 0)
            stolen = libc.syscall(_SYS_PIDFD_GETFD, pidfd, 0, 0)
            if stolen >= 0:
                os.close(stolen)
            if signalled == -1 and stolen == -1:
                raise OSError(ctypes.get_errno(), "pidfd_send_signal and pidfd_getfd refused")
            return f"signal {signalled} getfd {stolen}"
        finally:
            os.close(pidfd)

    tries["pidfd_getfd(parent)"] = _try(pidfd_getfd)

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    def vm_read() -> str:
        buf = ctypes.create_string_buffer(8)
        local = IoVec(ctypes.cast(buf, ctypes.c_void_p), 8)
        remote = IoVec(int(params["address"]), 8)
        rc = libc.syscall(
            _SYS_PROCESS_VM_READV, ppid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0
        )
        return errno_of(rc) + ":" + buf.raw.hex()

    tries["process_vm_readv(parent)"] = _try(vm_read)
    return {"tries": json.dumps(tries)}


def test_a_hostile_analysis_cannot_read_signal_or_trace_the_runtime(tmp_path: Path) -> None:
    paths = _node(tmp_path)
    canary = ctypes.create_string_buffer(SECRET.encode())
    ctx = _context(
        key=str(paths["key"]), address=str(ctypes.addressof(canary)), runtime=os.getpid()
    )
    got: list[int] = []
    previous = signal.signal(signal.SIGWINCH, lambda signum, frame: got.append(signum))
    try:
        tries = _run(parent_reader, ctx, paths)["tries"]
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGWINCH, previous)
    assert got == []  # no signal of the analysis reached the runtime
    leaked = {k: v for k, v in tries.items() if v["ok"] and not k.startswith("group:")}
    assert leaked == {}, leaked
    assert SECRET not in json.dumps(tries)
    assert SECRET[:8].encode().hex() not in json.dumps(tries)


# --- 3. a process of the analysis outlives its run ---------------------------------------------


def lingerer(data: Any, epoch: int = 0, previous: Any = None) -> Any:
    """Forks a grandchild in a session of its own that outlives the child, keeps writing into
    the scratch folder (so emptying it races) and keeps a passed data descriptor open."""
    import tempfile

    scratch = tempfile.gettempdir()
    rpc = next(o for o in gc.get_objects() if type(o).__name__ == "_Rpc")
    fd = rpc.descriptor("node", "x.csv")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the grandchild
        os.close(read)
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        # its pid as this machine sees it (in a PID namespace os.getpid() is another number)
        os.write(write, os.readlink("/proc/self").encode())
        os.close(write)
        end = time.monotonic() + 60
        n = 0
        while time.monotonic() < end:
            with contextlib.suppress(OSError):
                Path(scratch, f"keep{n % 50}").write_bytes(os.pread(fd, 64, 0))
            n += 1
            time.sleep(0.001)
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    survivor = int(os.read(read, 32))
    os.close(fd)
    return {"survivor": survivor, "scratch": scratch}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_no_process_of_the_analysis_outlives_its_run(tmp_path: Path) -> None:
    paths = _node(tmp_path)
    result = _run(lingerer, _context(), paths)
    survivor = int(result["survivor"])
    try:
        time.sleep(0.5)
        alive = _alive(survivor)
        scratch_left = os.path.exists(str(result["scratch"]))
    finally:
        with contextlib.suppress(OSError):
            os.kill(survivor, signal.SIGKILL)  # the process this test's analysis started
    assert not alive, f"analysis process {survivor} still runs after the run ended"
    assert not scratch_left


# --- 4. the result crosses in a memfd the child still holds ----------------------------------

MEMFD_ANALYSIS = r"""
import os, threading, time
import numpy as np

KEPT = []
_create = os.memfd_create


def _spy(name, flags=0):
    fd = _create(name, flags)
    KEPT.append(os.dup(fd))
    return fd


def _later(mode):
    while not KEPT:
        time.sleep(0.001)
    time.sleep(0.3)  # the runtime has decoded and checked the result by now
    fd = KEPT[-1]
    if mode == "truncate":
        os.ftruncate(fd, 0)
        return
    size = os.fstat(fd).st_size
    frame = os.pread(fd, size, 0)
    one, seven = np.float64(1.0).tobytes(), np.float64(7.0).tobytes()
    os.pwrite(fd, frame.replace(one * 4, seven * 4), 0)


def analyze(data, epoch=0, previous=None):
    import flame
    os.memfd_create = _spy
    threading.Thread(target=_later, args=(flame.context().params["mode"],), daemon=True).start()
    return {"counts": np.ones(100_000)}
"""

MEMFD_VICTIM = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import memfd_analysis
from flame.data import Data
from flame.isolation.runner import ChildRunner
from flame.node.context import Context

ctx = Context(analysis_id="redteam", node_id="n", role="analysis", participants=["n"],
              aggregator_id="agg", mailbox=None)
ctx.params = {"mode": sys.argv[2]}
runner = ChildRunner(memfd_analysis.analyze, Data({}), ctx)
try:
    counts = runner.run(0, None).result["counts"]
    checked = float(counts.sum())  # what the gate would check
    time.sleep(1.0)
    sent = float(counts.sum())  # what the node would send (or re-send) later
    print(json.dumps({"checked": checked, "sent": sent}), flush=True)
finally:
    runner.close()
"""


def _memfd_attack(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "memfd_analysis.py").write_text(MEMFD_ANALYSIS)
    victim = tmp_path / "victim.py"
    victim.write_text(textwrap.dedent(MEMFD_VICTIM))
    return subprocess.run(
        [sys.executable, str(victim), str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_result_cannot_change_after_the_runtime_received_it(tmp_path: Path) -> None:
    done = _memfd_attack(tmp_path, "rewrite")
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["checked"] == 100_000.0
    assert seen["sent"] == seen["checked"], seen


def test_a_truncated_result_memfd_does_not_kill_the_runtime(tmp_path: Path) -> None:
    done = _memfd_attack(tmp_path, "truncate")
    assert done.returncode != -signal.SIGBUS, "the runtime process died of SIGBUS"
    assert done.returncode == 0, done.stderr[-2000:]


# --- 5. the channel protocol: malformed and path-tricking requests ---------------------------


def protocol_fuzzer(data: Any, epoch: int = 0, previous: Any = None) -> Any:
    rpc = next(o for o in gc.get_objects() if type(o).__name__ == "_Rpc")
    key = flame.context().params["key"]
    rel = os.path.relpath(key, flame.context().params["data"])
    names = [
        rel,
        key,
        "../secrets/identity.key",
        "x.csv/../../secrets/identity.key",
        "x.csv\x00../../secrets/identity.key",
        "./../secrets/identity.key",
        "..\\secrets\\identity.key",
        "\u2025/secrets/identity.key",
        "%2e%2e/secrets/identity.key",
        "",
        ".",
        "/proc/self/environ",
    ]
    tries: dict[str, Any] = {}
    for name in names:
        for op in ("read", "open"):
            if op == "read":
                tries[f"{op} {name[:60]!r}"] = _try(
                    lambda n=name: rpc.call("read", source="node", name=n)
                )
            else:
                tries[f"{op} {name[:60]!r}"] = _try(
                    lambda n=name: os.close(rpc.descriptor("node", n))
                )
    for bad in (
        {"op": "read", "args": "not a dict"},
        {"op": "read", "args": {}},
        {"op": "nope" * 10_000, "args": {}},
        {"op": "source_call", "args": {"source": "node", "method": "files"}},
        {"op": "source_call", "args": {"source": "node", "method": "__init__"}},
        {"op": "save", "args": {"tag": "../runtime/flame-threshold-guard", "value": 1}},
        {"op": "progress", "args": {"fraction": "nan"}},
        {"op": "progress", "args": {"fraction": 1e308}},
        {"op": "send", "args": {"category": "flame.threshold.decrypt", "body": 1}},
        ["not", "a", "dict"],
    ):

        def call(b: Any = bad) -> Any:
            rpc.channel.send("call", b)
            return rpc.channel.receive()

        tries[f"raw {json.dumps(bad)[:60]}"] = _try(call)
    tries["big read"] = _try(lambda: len(rpc.call("read", source="node", name="x.csv")))
    return {"tries": json.dumps(tries)}


def test_malformed_and_path_tricking_requests_are_refused_and_the_runtime_survives(
    tmp_path: Path,
) -> None:
    paths = _node(tmp_path)
    ctx = _context(NodeState(FileStore(paths["state"]), "redteam", "n"), key=str(paths["key"]))
    ctx.params["data"] = str(paths["data"])
    tries = _run(protocol_fuzzer, ctx, paths)["tries"]
    assert SECRET not in json.dumps(tries)
    for what, outcome in tries.items():
        if what.startswith(("read", "open")):
            assert outcome["ok"] is False, (what, outcome)
        elif what.startswith("raw"):  # answered (the runtime lives), refused but progress
            value = outcome.get("value", "")
            assert outcome["ok"] and value.startswith("('reply'"), (what, outcome)
            assert "progress" in what or "'error'" in value, (what, outcome)
    assert tries["big read"] == {
        "ok": True,
        "value": str(len((paths["data"] / "x.csv").read_bytes())),
    }
    assert not any(p.name.startswith("flame-") for p in paths["state"].rglob("*"))


# --- 6. reserved state: spellings of 'flame-' -------------------------------------------------


def tag_forger(data: Any, epoch: int = 0, previous: Any = None) -> Any:
    ctx = flame.context()
    tags = [
        "FLAME-threshold-guard",
        "Flame.threshold-guard",
        "\ufb02ame-threshold-guard",  # the 'fl' ligature
        "flame\u200b-threshold-guard",
        "\uff46lame-threshold-guard",  # fullwidth f
        " flame-threshold-guard",
        "flame-threshold-guard ",
        "flame\u2010threshold-guard",  # unicode hyphen
        "./flame-threshold-guard",
        "../runtime/flame-threshold-guard",
        "..%2fruntime%2fflame-threshold-guard",
    ]
    tries: dict[str, Any] = {}
    for tag in tags:
        tries[f"save {tag!r}"] = _try(lambda t=tag: ctx.save(t, {"junk": 1}))
        tries[f"load {tag!r}"] = _try(lambda t=tag: ctx.load(t))
    return {"tries": json.dumps(tries)}


def test_no_spelling_of_a_reserved_tag_reaches_the_runtimes_state(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from flame.secure.guard import GuardLedger

    state_dir = tmp_path / "state"
    state = NodeState(FileStore(state_dir), "redteam", "n")
    share = SimpleNamespace(secret=987654321, node_id="n", index=1)
    ledger = GuardLedger(share, state)  # type: ignore[arg-type]
    ledger._load()
    ledger._fixed = {"a": {"sum": ["n", "m"]}}
    ledger._save()
    before = {p: p.read_bytes() for p in state_dir.rglob("*") if p.is_file()}
    tries = _run(tag_forger, _context(state))["tries"]
    after = {p: p.read_bytes() for p in state_dir.rglob("*") if p.is_file()}
    for path, content in before.items():
        assert after[path] == content
    for path in set(after) - set(before):  # what the analysis stored: its own, no flame- tag
        assert "/runtime/" not in str(path)
        assert not path.name.lower().startswith(("flame-", "flame."))
    again = GuardLedger(share, NodeState(FileStore(state_dir), "redteam", "n"))  # type: ignore[arg-type]
    again._load()
    assert again.fixed_sets("a") == {"sum": ("n", "m")}
    for what, outcome in tries.items():  # every spelling refused (reserved, or not a tag)
        assert outcome["ok"] is False, (what, outcome)


# --- 7. the reviewed bytes: a symlink in the analysis folder ---------------------------------


def test_the_snapshot_does_not_copy_a_node_secret_through_a_symlinked_code_file(
    tmp_path: Path,
) -> None:
    """The operator hashes the folder as delivered (on the node) and reviews main.py; a
    symlinked `notes.py` there points at the node's key. `flame hash` follows it (the hash
    covers the key's bytes, so the approval matches), and the snapshot copies the key into
    the child's readable code folder."""
    paths = _node(tmp_path)
    code = tmp_path / "code"
    code.mkdir()
    (code / "main.py").write_text(
        textwrap.dedent(
            """
            import os

            def analyze(data, epoch=0, previous=None):
                here = os.path.dirname(os.path.abspath(__file__))
                with open(os.path.join(here, "notes.py")) as stream:
                    return {"notes": stream.read()}

            def aggregate(results, epoch=0, previous=None):
                return results
            """
        )
    )
    (code / "notes.py").symlink_to(paths["key"])
    try:
        analysis = AnalysisAt(code / "main.py")
    except (AnalysisLoadError, Exception) as exc:  # refused: the safe outcome
        assert SECRET not in str(exc)
        return
    runner = ChildRunner(
        analysis, Data({}), _context(), hide=[paths["data"], paths["state"], paths["secrets"]]
    )
    try:
        try:
            result = runner.run(0, None).result
        except AnalysisError as exc:
            result = {"error": str(exc)}
    finally:
        runner.close()
    assert SECRET not in json.dumps(result, default=str)


# --- 8. a big, deep or wide result does not take the runtime down ----------------------------


def deep_result(data: Any, epoch: int = 0, previous: Any = None) -> Any:
    value: Any = 1
    for _ in range(int(flame.context().params["depth"])):
        value = [value]
    return {"deep": value}


def test_a_deeply_nested_result_is_refused_cleanly(tmp_path: Path) -> None:
    runner = ChildRunner(deep_result, Data({}), _context(depth=100_000))
    try:
        with pytest.raises((AnalysisError, flame.errors.FlameError, ValueError)):
            runner.run(0, None)
    finally:
        runner.close()


# --- 9. on real signed `flame run` nodes ------------------------------------------------------

NODE = "node-0"


def _federation(
    broker: Any, tmp_path: Path, name: str, analysis_text: str, csv: str, **node_env: str
) -> dict[str, str]:
    """One aggregator and one analysis node run `analysis_text` (approved by hash) on
    `csv`; what each printed (stdout + stderr), the node's log files kept apart."""
    federation = one_node_federation(
        broker,
        tmp_path,
        tmp_path / "code" / "analysis.py",
        textwrap.dedent(analysis_text),
        f"{name}-{tmp_path.name}",
        node=NODE,
        csv=csv,
        epoch_timeout=30,
    )
    try:
        federation.start("aggregator")
        federation.start(NODE, **node_env)
        for process in federation.processes.values():
            with contextlib.suppress(AssertionError):
                process.wait(120)
        out = {node: p.stdout() + p.stderr() for node, p in federation.processes.items()}
        out["node-stderr"] = federation.processes[NODE].stderr()
        out["node-stdout"] = federation.processes[NODE].stdout()
    finally:
        federation.close()
    return out


KEYERROR = """
import flame

def analyze(data):
    table = data.read_csv("x.csv")
    by_code = {"A": 1, "B": 2}
    return {"n": flame.dp.count("v", epsilon=0.5), "codes": sum(by_code[c] for c in table["code"])}

def aggregate(results):
    return results
"""


@needs_mosquitto
def test_a_data_value_in_the_analysis_own_error_stays_on_its_node(
    mqtt_broker: Any, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(f'epsilon_budget = 5.0\nledger_dir = "{tmp_path / "ledger"}"\n')
    out = _federation(
        mqtt_broker,
        tmp_path,
        "keyerror",
        KEYERROR,
        "code,v\nA,1\npatient0-XK9,2\n",
        FLAME_POLICY=str(policy),
    )
    assert "KeyError" in out["aggregator"], out["aggregator"][-2000:]  # the failure arrives
    assert "patient0-XK9" in out["node-stderr"]  # the node's own log keeps it
    assert "patient0-XK9" not in out["aggregator"], out["aggregator"][-2000:]


LOG_WIPER = """
import os

def analyze(data):
    os.ftruncate(2, 0)  # the node's log file: the descriptor the child inherited
    os.lseek(2, 0, os.SEEK_SET)
    os.write(2, b"FORGED-LOG-LINE analysis finished normally\\n")
    os.write(1, b'{"forged": "FORGED-FINAL-VALUE"}\\n')
    return {"n": 1}

def aggregate(results):
    return results
"""


@needs_mosquitto
def test_the_analysis_cannot_wipe_or_forge_the_nodes_log(mqtt_broker: Any, tmp_path: Path) -> None:
    out = _federation(
        mqtt_broker, tmp_path, "logwipe", LOG_WIPER, "v\n1\n", FLAME_LOG_LEVEL="DEBUG"
    )
    # what the analysis printed is relayed as its output, never as a line of the node's own
    assert "FORGED" not in out["node-stdout"], out["node-stdout"][-2000:]
    for line in out["node-stderr"].splitlines():
        if "FORGED" in line:
            assert "analysis stderr: FORGED" in line or "analysis output: " in line, line
    assert "approved on this node" in out["node-stderr"]  # written before the epoch: kept


# --- 10. a small result that decodes huge in the runtime --------------------------------------

AMPLIFIER = """
import flame

def analyze(data, epoch=0, previous=None):
    return {"x": [{}] * int(flame.context().params["n"])}  # 3 bytes a dict on the wire
"""

AMPLIFIER_VICTIM = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import amplifier
import flame.isolation.channel as channel
from flame.data import Data
from flame.isolation.runner import ChildRunner
from flame.node.context import Context

ctx = Context(analysis_id="redteam", node_id="n", role="analysis", participants=["n"],
              aggregator_id="agg", mailbox=None)
ctx.params = {"n": sys.argv[2]}
runner = ChildRunner(amplifier.analyze, Data({}), ctx)
runner.start()
sizes = []
decode = channel.decode
def measured(frame, **limits):
    sizes.append(memoryview(frame).nbytes)
    return decode(frame, **limits)
channel.decode = measured
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
try:
    try:
        runner.run(0, None)
    except Exception as exc:  # refused: the safe outcome
        print(json.dumps({"refused": type(exc).__name__}), flush=True)
        sys.exit(0)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"frame": max(sizes), "grew": grew}), flush=True)
finally:
    runner.close()
"""


def test_a_result_cannot_make_the_runtime_allocate_far_more_than_it_sent(tmp_path: Path) -> None:
    (tmp_path / "amplifier.py").write_text(AMPLIFIER)
    victim = tmp_path / "victim.py"
    victim.write_text(AMPLIFIER_VICTIM)
    done = subprocess.run(
        [sys.executable, str(victim), str(tmp_path), "1000000"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    if "refused" in seen:
        return
    assert seen["grew"] <= 10 * seen["frame"], seen  # at most 10 bytes per byte sent


# --- 11. a request that holds the runtime past its deadline -----------------------------------

STALLER = """
import flame

def analyze(data):
    # the runtime serves this in its own thread of control: while it waits, it neither
    # checks the epoch deadline nor hears the aggregator's abort
    flame.context().receive("never", senders=["aggregator"], timeout=1e6)
    return {"n": 1}

def aggregate(results):
    return results
"""


@needs_mosquitto
def test_a_request_cannot_hold_the_runtime_past_its_epoch_deadline(
    mqtt_broker: Any, tmp_path: Path
) -> None:
    federation = one_node_federation(
        mqtt_broker,
        tmp_path,
        tmp_path / "staller.py",
        STALLER,
        f"stall-{tmp_path.name}",
        node=NODE,
        epoch_timeout=5,
    )
    try:
        federation.start("aggregator")
        node = federation.start(NODE)
        federation.processes["aggregator"].wait(120)  # gives up on the node, aborts the run
        try:
            node.wait(60)  # the node follows (abort or its own deadline), however it ends
            ended = True
        except AssertionError:
            ended = False
    finally:
        federation.close()
    assert ended, "the node still waits on the analysis's request long after its deadline"


# --- 12. named Unix sockets: past the seccomp connect() filter -------------------------------

_IO_URING_SETUP, _IO_URING_ENTER = 425, 426
_IORING_OP_CONNECT, _IORING_OFF_SQES, _IORING_ENTER_GETEVENTS = 16, 0x10000000, 1


def _uring(opcode: int, fd: int, off: int, addr: int, length: int) -> int:
    """One io_uring operation (no syscall of its kind is made: seccomp never sees it);
    the completion's result (>= 0, or -errno)."""
    import mmap
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    params = ctypes.create_string_buffer(120)
    ring = libc.syscall(_IO_URING_SETUP, 4, params)
    if ring < 0:
        raise OSError(ctypes.get_errno(), "io_uring_setup")
    try:
        sq_entries, cq_entries = struct.unpack_from("=II", params.raw, 0)
        sq_off = struct.unpack_from("=IIIIIIIIQ", params.raw, 40)
        cq_off = struct.unpack_from("=IIIIIIIIQ", params.raw, 80)
        size = max(sq_off[6] + sq_entries * 4, cq_off[5] + cq_entries * 16)
        shared = mmap.MAP_SHARED | mmap.MAP_POPULATE
        rings = mmap.mmap(ring, size, shared, offset=0)
        sqes = mmap.mmap(ring, sq_entries * 64, shared, offset=_IORING_OFF_SQES)
        sqes[0:64] = struct.pack(
            "=BBHiQQIIQHHiQQ", opcode, 0, 0, fd, off, addr, length, 0, 7, 0, 0, 0, 0, 0
        )
        tail = struct.unpack_from("=I", rings, sq_off[1])[0]
        mask = struct.unpack_from("=I", rings, sq_off[2])[0]
        struct.pack_into("=I", rings, sq_off[6] + 4 * (tail & mask), 0)
        struct.pack_into("=I", rings, sq_off[1], tail + 1)
        if libc.syscall(_IO_URING_ENTER, ring, 1, 1, _IORING_ENTER_GETEVENTS, None, 0) < 0:
            raise OSError(ctypes.get_errno(), "io_uring_enter")
        head = struct.unpack_from("=I", rings, cq_off[0])[0]
        cmask = struct.unpack_from("=I", rings, cq_off[2])[0]
        _user, result, _flags = struct.unpack_from("=QiI", rings, cq_off[5] + 16 * (head & cmask))
        return int(result)
    finally:
        os.close(ring)


def _uring_connect(sock: Any, path: str) -> int:
    """connect() of `sock` to the Unix socket `path`, done by io_uring."""
    import socket
    import struct

    address = ctypes.create_string_buffer(struct.pack("=H", socket.AF_UNIX) + path.encode() + b"\0")
    return _uring(
        _IORING_OP_CONNECT, sock.fileno(), ctypes.sizeof(address), ctypes.addressof(address), 0
    )


def socket_caller(data: Any, epoch: int = 0, previous: Any = None) -> Any:
    import socket

    params = flame.context().params
    tries: dict[str, Any] = {}

    def plain_connect() -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(params["stream"])
            return "connected"

    def uring_connect() -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            result = _uring_connect(sock, params["stream"])
            if result < 0:
                raise OSError(-result, os.strerror(-result))
            sock.sendall(b"HELLO-FROM-THE-ANALYSIS")
            return "connected by io_uring"

    def datagram() -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"HELLO-FROM-THE-ANALYSIS", params["dgram"])
            return "sent"

    tries["connect()"] = _try(plain_connect)
    tries["io_uring connect"] = _try(uring_connect)
    tries["sendto datagram"] = _try(datagram)
    return {"tries": json.dumps(tries)}


def _listening(tmp_path: Path) -> tuple[Any, Any, str, str]:
    import socket

    folder = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: sun_path is 108 bytes
    stream_path, dgram_path = str(folder / "s.sock"), str(folder / "d.sock")
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(stream_path)
    stream.listen(4)
    stream.settimeout(0.5)
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(dgram_path)
    dgram.settimeout(0.5)
    return stream, dgram, stream_path, dgram_path


def _heard(stream: Any, dgram: Any) -> list[str]:
    heard: list[str] = []
    with contextlib.suppress(OSError):
        conn, _ = stream.accept()
        conn.settimeout(0.5)
        with conn:
            heard.append("stream: " + conn.recv(100).decode(errors="replace"))
    with contextlib.suppress(OSError):
        heard.append("dgram: " + dgram.recv(100).decode(errors="replace"))
    return heard


def test_the_analysis_reaches_no_named_unix_socket(tmp_path: Path) -> None:
    stream, dgram, stream_path, dgram_path = _listening(tmp_path)
    try:
        ctx = _context(stream=stream_path, dgram=dgram_path)
        tries = _run(socket_caller, ctx)["tries"]
        heard = _heard(stream, dgram)
    finally:
        stream.close()
        dgram.close()
        shutil.rmtree(os.path.dirname(stream_path), ignore_errors=True)
    assert tries["connect()"]["ok"] is False  # the filter the builder added holds
    assert heard == [], (heard, tries)


# --- 13. metadata changes past the seccomp filter ---------------------------------------------

_IORING_OP_FSETXATTR = 41
_ACL_OTHER_RW = (  # system.posix_acl_access: user::rw-, group::r--, other::rw-
    b"\x02\x00\x00\x00" + b"\x01\x00\x06\x00\xff\xff\xff\xff"
    b"\x04\x00\x04\x00\xff\xff\xff\xff" + b"\x20\x00\x06\x00\xff\xff\xff\xff"
)


def metadata_changer(data: Any, epoch: int = 0, previous: Any = None) -> Any:
    target = flame.context().params["target"]
    tries: dict[str, Any] = {}
    tries["setxattr()"] = _try(lambda: os.setxattr(target, "user.flame_rt", b"x"))
    tries["chmod()"] = _try(lambda: os.chmod(target, 0o666))

    def uring_set(name: bytes, value: bytes) -> str:
        fd = os.open(target, os.O_RDONLY)  # only readable in the child's domain
        try:
            key, val = ctypes.create_string_buffer(name), ctypes.create_string_buffer(value)
            result = _uring(
                _IORING_OP_FSETXATTR, fd, ctypes.addressof(val), ctypes.addressof(key), len(value)
            )
        finally:
            os.close(fd)
        if result < 0:
            raise OSError(-result, os.strerror(-result))
        return "set by io_uring"

    tries["io_uring fsetxattr user."] = _try(lambda: uring_set(b"user.flame_rt", b"planted"))
    tries["io_uring fsetxattr acl"] = _try(
        lambda: uring_set(b"system.posix_acl_access", _ACL_OTHER_RW)
    )
    return {"tries": json.dumps(tries)}


def test_the_analysis_changes_no_metadata_of_what_it_may_only_read(tmp_path: Path) -> None:
    import importlib.util

    code = tmp_path / "code"
    code.mkdir()
    target = code / "runtime_file.py"  # readable by the child (beside its code), not writable
    target.write_text("x = 1\n")
    os.chmod(target, 0o644)
    module_file = code / "meta_analysis.py"
    module_file.write_text(
        "from test_attacks_sandbox_redteam import metadata_changer\n\n"
        "def analyze(data, epoch=0, previous=None):\n"
        "    return metadata_changer(data, epoch, previous)\n"
    )
    spec = importlib.util.spec_from_file_location("meta_analysis", module_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["meta_analysis"] = module  # where the runner finds the module's file
    before = (os.stat(target).st_mode, os.listxattr(target))
    try:
        tries = _run(module.analyze, _context(target=str(target)))["tries"]
    finally:
        sys.modules.pop("meta_analysis", None)
    after = (os.stat(target).st_mode, os.listxattr(target))
    assert tries["setxattr()"]["ok"] is False and tries["chmod()"]["ok"] is False
    assert after == before, (before, after, tries)


# --- 14. flame's own quoting: a value holding an apostrophe ----------------------------------

APOSTROPHE = """
def analyze(data):
    # an honest mistake: comparing a text column with a number
    return {"n": data.sql("select count(*) as n from x where name = 1").num_rows}

def aggregate(results):
    return results
"""


@needs_mosquitto
def test_a_value_with_an_apostrophe_in_a_sql_error_stays_on_its_node(
    mqtt_broker: Any, tmp_path: Path
) -> None:
    out = _federation(mqtt_broker, tmp_path, "apostrophe", APOSTROPHE, "age,name\n62,O'Brien-XQ1\n")
    assert "SQL failed" in out["aggregator"], out["aggregator"][-2000:]  # the failure arrives
    assert "withheld" in out["aggregator"]
    assert "Brien-XQ1" not in out["aggregator"], out["aggregator"][-2000:]


SIGBUS_NODE = """
import os, threading, time
import numpy as np

KEPT = []
_create = os.memfd_create


def _spy(name, flags=0):
    fd = _create(name, flags)
    KEPT.append(os.dup(fd))
    return fd


def _later():
    while not KEPT:
        time.sleep(0.0002)
    time.sleep(0.03)  # the runtime has mapped the result and is checking or sending it
    os.ftruncate(KEPT[-1], 0)


def analyze(data):
    os.memfd_create = _spy
    threading.Thread(target=_later, daemon=True).start()
    return {"counts": np.ones(2_000_000)}


def aggregate(results):
    return {k: float(v["counts"].sum()) for k, v in results.items()}
"""


@needs_mosquitto
def test_a_real_node_survives_a_truncated_result_memfd(mqtt_broker: Any, tmp_path: Path) -> None:
    federation = one_node_federation(
        mqtt_broker,
        tmp_path,
        tmp_path / "sigbus.py",
        SIGBUS_NODE,
        f"sigbus-{tmp_path.name}",
        node=NODE,
        epoch_timeout=20,
    )
    try:
        federation.start("aggregator")
        code = federation.start(NODE).wait(90)
    finally:
        federation.close()
    assert code != -signal.SIGBUS, "flame run died of SIGBUS"


# --- 15. the operator's terminal ----------------------------------------------------------------

TIOCSTI_ANALYSIS = """
import fcntl, termios

def analyze(data=None, epoch=0, previous=None):
    typed = 0
    for char in b"echo INJECTED-BY-ANALYSIS\\n":  # typed into the operator's shell
        try:
            fcntl.ioctl(2, termios.TIOCSTI, bytes([char]))
            typed += 1
        except OSError:
            pass
    return {"typed": typed}
"""

TIOCSTI_VICTIM = r"""
import json, os, select, sys
sys.path.insert(0, sys.argv[1])
import tiocsti_analysis
from flame.data import Data
from flame.isolation.runner import ChildRunner
from flame.node.context import Context

ctx = Context(analysis_id="redteam", node_id="n", role="analysis", participants=["n"],
              aggregator_id="agg", mailbox=None)
runner = ChildRunner(tiocsti_analysis.analyze, Data({}), ctx)
try:
    typed = runner.run(0, None).result["typed"]
finally:
    runner.close()
ready, _, _ = select.select([0], [], [], 1.0)  # what the terminal now holds as typed input
pending = os.read(0, 200).decode(errors="replace") if ready else ""
with open(sys.argv[2], "w") as out:
    json.dump({"typed": typed, "pending": pending}, out)
"""


def test_the_analysis_cannot_type_into_the_operators_terminal(tmp_path: Path) -> None:
    import pty

    (tmp_path / "tiocsti_analysis.py").write_text(TIOCSTI_ANALYSIS)
    victim = tmp_path / "victim.py"
    victim.write_text(TIOCSTI_VICTIM)
    report = tmp_path / "report.json"
    pid, master = pty.fork()
    if pid == 0:  # a node started from a terminal (its controlling tty)
        os.execv(sys.executable, [sys.executable, str(victim), str(tmp_path), str(report)])
    screen = b""
    try:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            screen += chunk
    finally:
        os.close(master)
        os.waitpid(pid, 0)
    assert report.exists(), screen.decode(errors="replace")[-2000:]
    seen = json.loads(report.read_text())
    assert "INJECTED" not in seen["pending"], seen
    assert seen["typed"] == 0, seen

"""The lazy public API: `flame --version`/`--help` load no heavy modules, names still resolve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import flame


def _modules_after(code: str) -> set[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_version_and_help_load_neither_pydantic_nor_numpy() -> None:
    loaded = _modules_after(
        "from flame.cli import main\n"
        "for argv in (['--version'], ['--help'], ['simulate', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass"
    )
    assert "flame.cli" in loaded
    heavy = {"pydantic", "pydantic_settings", "numpy", "httpx", "minio", "paho", "gmpy2"}
    assert not heavy & loaded, sorted(heavy & loaded)


def test_simulation_loads_no_network_client() -> None:
    loaded = _modules_after("import flame\nflame.simulate\nimport flame.testing")
    assert "flame.simulate" in loaded and "numpy" in loaded
    assert not {"httpx", "minio", "paho", "gmpy2", "phe"} & loaded


def test_every_public_name_resolves_and_is_what_it_was() -> None:
    for name in flame.__all__:
        assert getattr(flame, name) is not None, name
    from flame import RunResult, secure, simulate
    from flame.aggregator.records import RunResult as Record
    from flame.secure.fields import secure as mark

    assert RunResult is Record and secure is mark and callable(simulate)
    assert set(flame.__all__) <= set(dir(flame))


def test_flame_simulate_stays_the_function_after_the_submodule_is_imported() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import flame.simulate, flame.testing, flame\n"
            "from flame.simulate import DataSpec\n"
            "print(type(flame.simulate).__name__, flame.simulate.__module__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["function", "flame.simulate"]


def test_unknown_attribute_is_an_attribute_error() -> None:
    try:
        flame.no_such_thing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_flame_simulate_starts_its_fork_server_early_and_uses_it(tmp_path) -> None:
    """The CLI starts the analysis fork server before its own imports (issue 23: not one
    cold child per node); every node's analyze runs in a child of that server, no child is
    spawned per node, and the server is gone when the command exits."""
    (tmp_path / "analysis.py").write_text(
        "import os\n\n"
        "def analyze(data):\n"
        "    with open('/proc/self/stat') as stat:  # as the host sees them\n"
        "        text = stat.read()\n"
        "    return {'pid': int(text.split(' ', 1)[0]),\n"
        "            'parent': int(text.rsplit(')', 1)[1].split()[1])}\n\n"
        "def aggregate(results):\n"
        "    return sorted([r['pid'], r['parent']] for r in results.values())\n"
    )
    for node in ("a", "b", "c"):
        (tmp_path / "data" / node).mkdir(parents=True)
        (tmp_path / "data" / node / "x.csv").write_text("v\n1\n")
    probe = (
        "import sys\n"
        "from flame.isolation import forkserver, spawn\n"
        "spawned, early = [], []\n"
        "original = spawn.spawn_child\n"
        "def counting(*args, **kw):\n"
        "    process, sock = original(*args, **kw)\n"
        "    spawned.append(process.pid)\n"
        "    return process, sock\n"
        "spawn.spawn_child = counting\n"
        "started = forkserver.ForkServer.__init__\n"
        "def starting(self, *args, **kw):\n"
        "    early.append('flame.simulate' not in sys.modules)\n"
        "    started(self, *args, **kw)\n"
        "forkserver.ForkServer.__init__ = starting\n"
        "from flame.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "import os\n"
        "print('spawned', sorted(spawned), 'early', early,\n"
        "      'servers', [s.process.pid for s in forkserver._servers], 'me', os.getpid())\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "simulate", str(tmp_path / "analysis.py"),
         "--data", str(tmp_path / "data"), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    used = json.loads(done.stdout[: done.stdout.index("spawned")])
    tail = done.stdout.split("spawned")[1]
    assert json.loads(tail.split("early")[0]) == []  # no child per node
    assert json.loads(tail.split("early")[1].split("servers")[0].replace("True", "true")) == [
        True
    ]  # one server, started before flame.simulate was imported
    servers = json.loads(tail.split("servers")[1].split("me")[0])
    me = int(tail.split("me")[1])
    # one server; each node's analyze ran in a process of its own, forked by the server
    # (PID 1 of its own PID namespace), not by this process
    assert len(servers) == 1 and len({pid for pid, _ in used}) == 3
    assert len({parent for _, parent in used}) == 1 and used[0][1] != me
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(servers[0], 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{servers[0]}/stat") as stat:
            if stat.read().split(") ")[-1][:1] == "Z":
                break
        time.sleep(0.1)
    else:
        raise AssertionError("the fork server outlived the command")


def test_unused_early_children_are_stopped_at_exit() -> None:
    code = (
        "from flame.isolation import spawn\n"
        "spawn.prestart(2)\n"
        "print(' '.join(str(p.pid) for p, _, _ in spawn._warm))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        with open(f"/proc/{pid}/stat") as stat:
            assert stat.read().split(") ")[-1][:1] == "Z", f"child {pid} outlived its parent"

"""Nodes as real processes for tests: one way to build a node's FLAME_* environment, start
`flame run`, signal it, and collect how and when it ended.

Every multi-process test (test_mqtt_run, test_status, test_resume, test_fault_matrix) builds
its environments here, so a new setting reaches them all in one place. Output goes to files,
not pipes: a chatty node can never block on a full pipe, and a failing test shows the log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from broker import Broker

__all__ = [
    "Federation",
    "NodeProcess",
    "clean_env",
    "federation_env",
    "flame_process",
    "node_env",
    "storage_env",
]

AGGREGATOR = "aggregator"
IDENTITY_DIR = "TEST_FLAME_IDENTITY_DIR"  # not a flame setting: where node_env finds keys
_IDENTITIES = tempfile.TemporaryDirectory(prefix="flame-test-identities-")
_MADE: dict[tuple[str, ...], dict[str, str]] = {}


def clean_env() -> dict[str, str]:
    """This process's environment without any FLAME_* variable (tests set their own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FLAME_")}


def storage_env(settings: Mapping[str, Any]) -> dict[str, str]:
    """FLAME_STORAGE__* variables from storage settings (e.g. `S3Server.settings(...)`)."""
    return {f"FLAME_STORAGE__{key.upper()}": str(value) for key, value in settings.items()}


def federation_env(
    broker: Broker,
    analysis_id: str,
    participants: Iterable[str],
    *,
    epochs: int = 1,
    presence_timeout: float = 60,
    epoch_timeout: float = 60,
    storage: Mapping[str, Any] | None = None,
    **extra: str,
) -> dict[str, str]:
    """What every node of one run shares: analysis, roster, broker, timeouts, storage."""
    env = clean_env()
    env.update(
        {
            "FLAME_ANALYSIS_ID": analysis_id,
            "FLAME_PARTICIPANTS": ",".join(participants),
            "FLAME_BROKER__URL": broker.url,
            "FLAME_BROKER__TOKEN": broker.password,
            "FLAME_EPOCHS": str(epochs),
            "FLAME_PRESENCE_TIMEOUT": f"{presence_timeout:g}",
            "FLAME_EPOCH_TIMEOUT": f"{epoch_timeout:g}",
        }
    )
    if storage is not None:
        env.update(storage_env(storage))
    env.update(extra)
    if "FLAME_ROSTER" not in env and env.get("FLAME_ALLOW_UNSIGNED") != "true":
        env.update(
            identities_env(
                env["FLAME_PARTICIPANTS"].split(","), env.get("FLAME_AGGREGATOR_ID", AGGREGATOR)
            )
        )
    return env


def identities_env(participants: Iterable[str], aggregator: str = AGGREGATOR) -> dict[str, str]:
    """A fresh roster and identity keys for these nodes (in a folder kept for the session):
    FLAME_ROSTER, and where `node_env` finds each node's FLAME_IDENTITY__KEY_FILE."""
    from identities import federation

    # Members: the participants and every usual test node id, so a node outside this
    # analysis's participants is still a federation member (it can sign; it is told).
    members = sorted({*participants, *(f"node-{i}" for i in range(10))} - {aggregator})
    key = (aggregator, *members)
    if key not in _MADE:  # the same members get the same roster across calls (and tests)
        folder = Path(tempfile.mkdtemp(prefix="flame-ids-", dir=_IDENTITIES.name))
        federation(folder, members, aggregator)
        _MADE[key] = {
            "FLAME_ROSTER": str(folder / "roster.toml"),
            IDENTITY_DIR: str(folder / "keys"),
        }
    return dict(_MADE[key])


def node_env(
    env: Mapping[str, str],
    node: str,
    *,
    data_dir: Path | None = None,
    role: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """One node's environment: the shared one plus its id, role and (analysis) data folder."""
    aggregator = env.get("FLAME_AGGREGATOR_ID", AGGREGATOR)
    own = dict(env)
    own["FLAME_NODE_ID"] = node
    own["FLAME_ROLE"] = role or ("aggregation" if node == aggregator else "analysis")
    if IDENTITY_DIR in env and "FLAME_IDENTITY__KEY_FILE" not in env:
        own["FLAME_IDENTITY__KEY_FILE"] = str(Path(env[IDENTITY_DIR]) / f"{node}.key")
    if data_dir is not None:
        own["FLAME_DATA_DIR"] = str(data_dir)
    own.update(extra)
    return own


def shifted_clock(seconds: float) -> dict[str, str]:
    """Environment variables for a process whose wall clock is `seconds` off (negative:
    behind), through tests/clock_shift/sitecustomize.py; its children inherit the shift."""
    folder = str(Path(__file__).parent / "clock_shift")
    path = os.environ.get("PYTHONPATH", "")
    return {
        "PYTHONPATH": os.pathsep.join(p for p in (folder, path) if p),
        "TEST_CLOCK_SHIFT": f"{seconds:g}",
    }


def flame_process(
    args: list[str], env: Mapping[str, str], log: Path | None = None
) -> subprocess.Popen[str]:
    """`python -m flame ARGS`; stdout and stderr to pipes, or both appended to `log`."""
    if log is None:
        return subprocess.Popen(
            [sys.executable, "-m", "flame", *args],
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flame", *args],
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )


class NodeProcess:
    """One `flame run` process: stdout and stderr in files; the moment it exits is recorded."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], folder: Path) -> None:
        self.name = name
        folder.mkdir(parents=True, exist_ok=True)
        index = len(list(folder.glob(f"{name}.*.out")))
        self.stdout_path = folder / f"{name}.{index}.out"
        self.stderr_path = folder / f"{name}.{index}.err"
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flame", *args],
                env=dict(env),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
            )
        self.started = time.monotonic()
        self.ended: float | None = None
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        self.process.wait()
        self.ended = time.monotonic()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def signal(self, sig: int) -> float:
        """Send `sig`; returns the moment it was sent (monotonic)."""
        at = time.monotonic()
        self.process.send_signal(sig)
        return at

    def wait(self, timeout: float) -> int:
        """The exit code; AssertionError with the node's stderr if it runs past `timeout`."""
        self._waiter.join(timeout)
        if self._waiter.is_alive():
            raise AssertionError(f"{self.name} still running after {timeout:g} s:\n{self.tail()}")
        code = self.process.returncode
        assert code is not None
        return code

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def value(self) -> Any:
        """The final value the node printed (its last stdout line, JSON)."""
        lines = self.stdout().strip().splitlines()
        assert lines, f"{self.name} printed no result:\n{self.tail()}"
        return json.loads(lines[-1])

    def tail(self, chars: int = 3000) -> str:
        return self.stderr()[-chars:]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self._waiter.join(10)


class Federation:
    """The processes of one run (an aggregator and analysis nodes), all gone at `close()`."""

    def __init__(
        self,
        env: Mapping[str, str],
        analysis: Path,
        data: Path,
        nodes: Iterable[str],
        logs: Path,
    ) -> None:
        self.env = dict(env)
        self.analysis = analysis
        self.data = data
        self.nodes = list(nodes)
        self.logs = logs
        self.processes: dict[str, NodeProcess] = {}
        self.replaced: list[NodeProcess] = []

    def env_of(self, node: str, **extra: str) -> dict[str, str]:
        data_dir = None if node == AGGREGATOR else self.data / node
        return node_env(self.env, node, data_dir=data_dir, **extra)

    def start(self, node: str, **extra: str) -> NodeProcess:
        """Start `node` (again: the earlier process, if any, is kept for clean-up)."""
        if node in self.processes:
            self.replaced.append(self.processes[node])
        process = NodeProcess(
            node, ["run", str(self.analysis)], self.env_of(node, **extra), self.logs
        )
        self.processes[node] = process
        return process

    def start_all(self) -> None:
        for node in (AGGREGATOR, *self.nodes):
            self.start(node)

    def kill(self, node: str) -> None:
        """SIGKILL, as a crash: no goodbye, the broker's last will says offline."""
        process = self.processes[node]
        process.signal(signal.SIGKILL)
        process.wait(10)

    def finish(self, timeout: float = 150) -> dict[str, Any]:
        """Each node's final value; fails with every failing node's stderr otherwise."""
        deadline = time.monotonic() + timeout
        values: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for node, process in self.processes.items():
            try:
                code = process.wait(max(1.0, deadline - time.monotonic()))
            except AssertionError as exc:
                errors[node] = str(exc)
                continue
            if code != 0:
                errors[node] = f"exit {code}\n{process.tail()}"
                continue
            values[node] = process.value()
        assert not errors, "\n\n".join(f"--- {n}: {e}" for n, e in errors.items())
        return values

    def close(self) -> None:
        for process in [*self.processes.values(), *self.replaced]:
            process.kill()


class StatusWatcher:
    """Follows nodes' retained statuses as an operator would (broker user 'watcher')."""

    def __init__(self, broker: Broker, analysis_id: str, nodes: Iterable[str]) -> None:
        from flame.transport.mqtt import MqttTransport

        self.transport = MqttTransport(
            broker.settings(), analysis_id, "watcher", reconnect_delay=(1, 2)
        )
        self.transport.connect({"state": "watching"})
        self.transport.watch(list(nodes))
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def wait_for(
        self, node: str, state: str, epoch: int | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        """The first status of `node` in `state` (and `epoch`) from now; AssertionError after
        `timeout` naming what was seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            item = self.transport.receive(min(0.5, max(deadline - time.monotonic(), 0.0)))
            if item is None or item.kind != "status" or not isinstance(item.body, dict):
                continue
            self.seen.append((item.sender, item.body))
            if (
                item.sender == node
                and item.body.get("state") == state
                and (epoch is None or item.body.get("epoch") == epoch)
            ):
                return item.body
        raise AssertionError(f"{node} never reported {state} {epoch}; saw {self.seen[-10:]}")

    def wait_all(self, nodes: Iterable[str], state: str, epoch: int | None, timeout: float) -> None:
        """Until every one of `nodes` has reported `state` (and `epoch`) since this watcher
        started, in any order."""
        deadline = time.monotonic() + timeout
        for node in nodes:
            if any(
                sender == node
                and body.get("state") == state
                and (epoch is None or body.get("epoch") == epoch)
                for sender, body in self.seen
            ):
                continue
            self.wait_for(node, state, epoch, max(deadline - time.monotonic(), 0.1))

    def close(self) -> None:
        self.transport.close()

"""Authenticated federation against a real Mosquitto configured ONLY by `flame broker config`.

Several `flame run` processes; the broker's password file and ACL are the generated ones.
Covers: inbox isolation (raw paho), a full run with the generated config, split brain (two
processes, one node id), unapproved code (exit 2 before the data API sees a request), mixed
code hashes, and forged / replayed messages injected by a broker operator and a roster member.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from broker import MOSQUITTO, free_port, have_mosquitto
from nodes import NodeProcess, clean_env
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from flame.federated.run_store import code_hash
from flame.identity import Identity, Member, Roster, write_identity
from flame.identity.broker_config import write_broker_config
from flame.loader import load_analysis

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")

NODES = ["site_a", "site_b"]
VALUES = {"site_a": [1.0, 2.0, 3.0], "site_b": [10.0, 20.0]}
OPERATOR = "operator"  # a test-only broker operator who may read and write everything

ANALYSIS = """\
import time

def analyze(data, epoch, previous):
    x = data.read_csv()["x"]
    time.sleep(DELAY)
    return {"n": int(x.size), "sum": float(x.sum())}

def aggregate(results, epoch, previous):
    return {"n": sum(r["n"] for r in results.values()),
            "sum": sum(r["sum"] for r in results.values())}
"""


class GeneratedBroker:
    """Mosquitto on a free port, with the generated passwd/ACL/settings (plus a log)."""

    def __init__(self, folder: Path, roster: Roster, use_tool: bool | None = None) -> None:
        self.folder = folder
        self.files = write_broker_config(roster, folder / "broker", use_tool=use_tool)
        self.port = free_port()
        data = folder / "mosquitto-data"
        data.mkdir()
        text = self.files.config.read_text().replace(
            "persistence_location /var/lib/mosquitto/", f"persistence_location {data}/"
        )
        # the test's broker operator: can read every inbox (TLS ends at the broker)
        self.operator_password = "operator-" + os.urandom(8).hex()
        acl = self.files.acl.read_text() + f"\nuser {OPERATOR}\ntopic readwrite #\n"
        self.files.acl.write_text(acl)
        from flame.identity.broker_config import password_line

        with self.files.passwd.open("a") as handle:
            handle.write(password_line(OPERATOR, self.operator_password) + "\n")
        extra = [f"listener {self.port} 127.0.0.1", f"log_dest file {folder / 'broker.log'}"]
        if os.geteuid() == 0:
            extra.append("user root")
        self.config = folder / "mosquitto.conf"
        self.config.write_text(text + "\n".join(extra) + "\n")
        assert MOSQUITTO is not None
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.close()
        raise RuntimeError(f"mosquitto did not start: {self.log()}")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def token(self, user: str) -> str:
        return self.files.tokens[user].read_text().strip()

    def log(self) -> str:
        path = self.folder / "broker.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self, user: str, password: str | None = None) -> mqtt.Client:
        """A raw paho client logged in as `user` (MQTT 5)."""
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"raw-{user}-{os.urandom(4).hex()}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.username_pw_set(user, password if password is not None else self.token(user))
        client.connect("127.0.0.1", self.port, keepalive=10)
        client.loop_start()
        return client

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class Site:
    """A federation's files: identities, roster, data, the analysis, the broker."""

    def __init__(self, folder: Path, members: dict[str, str], use_tool: bool | None = None):
        self.folder = folder
        self.identities: dict[str, Identity] = {}
        self.keys: dict[str, Path] = {}
        entries = []
        for node, role in members.items():
            identity = Identity.generate(node)
            self.identities[node] = identity
            self.keys[node], _ = write_identity(identity, folder / "keys")
            entries.append(Member(node, role, identity.public_text))
        self.roster = Roster(entries)
        self.roster_file = folder / "roster.toml"
        self.roster.save(self.roster_file)
        self.broker = GeneratedBroker(folder, self.roster, use_tool)
        for node, values in VALUES.items():
            (folder / "data" / node).mkdir(parents=True)
            (folder / "data" / node / "x.csv").write_text(
                "x\n" + "".join(f"{v}\n" for v in values)
            )
        self.analysis = self.write_analysis("analysis.py", delay=0.0)
        self.results = folder / "results"
        self.logs = folder / "logs"

    def write_analysis(self, name: str, delay: float) -> Path:
        path = self.folder / "code" / name.removesuffix(".py") / name
        path.parent.mkdir(parents=True)
        path.write_text(ANALYSIS.replace("DELAY", repr(delay)))
        return path

    def env(self, node: str, analysis_id: str, **extra: Any) -> dict[str, str]:
        env = clean_env()
        env.update(
            FLAME_ANALYSIS_ID=analysis_id,
            FLAME_NODE_ID=node,
            FLAME_ROLE="aggregation" if node == "aggregator" else "analysis",
            FLAME_PARTICIPANTS=",".join(NODES),
            FLAME_BROKER__URL=self.broker.url,
            FLAME_BROKER__TOKEN_FILE=str(self.broker.files.tokens[node]),
            FLAME_ROSTER=str(self.roster_file),
            FLAME_IDENTITY__KEY_FILE=str(self.keys[node]),
            FLAME_PRESENCE_TIMEOUT="60",
            FLAME_EPOCH_TIMEOUT="60",
        )
        if node == "aggregator":
            env["FLAME_STORAGE__RESULTS_DIR"] = str(self.results)
        else:
            env["FLAME_DATA_DIR"] = str(self.folder / "data" / node)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def start(
        self, node: str, analysis_id: str, code: Path | None = None, **extra: Any
    ) -> NodeProcess:
        return NodeProcess(
            node,
            ["run", str(code or self.analysis)],
            self.env(node, analysis_id, **extra),
            self.logs,
        )

    def close(self) -> None:
        self.broker.close()


@pytest.fixture
def site() -> Iterator[Site]:
    folder = Path(tempfile.mkdtemp(prefix="flame-auth-"))
    made = Site(folder, {"aggregator": "aggregation", **{n: "analysis" for n in NODES},
                         "mallory": "analysis"})  # fmt: skip
    try:
        yield made
    finally:
        made.close()


def finish(processes: dict[str, NodeProcess], timeout: float = 90) -> dict[str, int]:
    codes = {}
    for name, process in processes.items():
        try:
            codes[name] = process.wait(timeout)
        finally:
            process.kill()
    return codes


# --- the generated ACL ----------------------------------------------------------------------


@pytest.mark.parametrize("use_tool", [True, False], ids=["mosquitto_passwd", "python-pbkdf2"])
def test_generated_acl_isolates_inboxes(tmp_path: Path, use_tool: bool) -> None:
    roster = Roster([Member(n, "analysis", Identity.generate(n).public_text) for n in ("a", "b")])
    broker = GeneratedBroker(tmp_path, roster, use_tool=use_tool)
    try:
        got: dict[str, list[bytes]] = {"a": [], "b": []}
        refused: list[str] = []

        def listen(user: str) -> mqtt.Client:
            client = broker.client(user)

            def on_message(c: Any, u: Any, message: mqtt.MQTTMessage) -> None:
                got[user].append(message.payload)

            def on_subscribe(c: Any, u: Any, mid: int, codes: list[Any], p: Any) -> None:
                refused.extend(f"{user}:{code}" for code in codes if code.is_failure)

            client.on_message = on_message
            client.on_subscribe = on_subscribe
            return client

        a, b = listen("a"), listen("b")
        time.sleep(0.3)
        a.subscribe("flame/x/b/inbox", qos=1)  # a tries to read b's mail
        b.subscribe("flame/x/b/inbox", qos=1)  # b reads its own
        time.sleep(0.5)
        a.publish("flame/x/b/inbox", b"to b", qos=1).wait_for_publish(5)  # a may write to b
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not got["b"]:
            time.sleep(0.05)
        time.sleep(0.5)
        assert got["b"] == [b"to b"], "the receiver itself must get its mail"
        assert got["a"] == [], "a read b's inbox: the ACL does not isolate inboxes"
        # a may write its own status, not b's (b, who reads statuses, sees only a's own)
        got["b"].clear()
        b.subscribe("flame/x/+/status", qos=1)
        time.sleep(0.5)
        a.publish("flame/x/a/status", b"mine", qos=1).wait_for_publish(5)
        a.publish("flame/x/b/status", b"forged", qos=1)  # the broker may also cut a off
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not got["b"]:
            time.sleep(0.05)
        time.sleep(0.5)
        assert got["b"] == [b"mine"]
        for client in (a, b):
            client.loop_stop()
            client.disconnect()
        intruder = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        intruder.username_pw_set("a", "wrong-password")
        result: list[Any] = []
        intruder.on_connect = lambda c, u, f, rc, p: result.append(rc)
        intruder.connect("127.0.0.1", broker.port)
        intruder.loop_start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not result:
            time.sleep(0.05)
        intruder.loop_stop()
        assert result and result[0].is_failure
    finally:
        broker.close()


# --- a whole run with the generated config ---------------------------------------------------


def test_signed_run_passes_with_the_generated_broker_config(site: Site) -> None:
    approved = code_hash(load_analysis(site.analysis).functions)
    processes = {
        node: site.start(node, "auth-run", FLAME_APPROVED_CODE=approved)
        for node in ("aggregator", *NODES)
    }
    codes = finish(processes)
    assert codes == {"aggregator": 0, "site_a": 0, "site_b": 0}, {
        n: p.tail() for n, p in processes.items()
    }
    for process in processes.values():
        assert process.value() == {"n": 5, "sum": 36.0}
    manifest = next(site.results.rglob("manifest.json"))
    assert json.loads(manifest.read_text())["roster_sha256"] == site.roster.fingerprint


# --- one live process per node id -----------------------------------------------------------


def test_two_processes_with_one_node_id_abort_the_run(site: Site) -> None:
    slow = site.write_analysis("slow.py", delay=0.3)
    extra = {"FLAME_EPOCHS": "200"}
    processes = {n: site.start(n, "split", code=slow, **extra) for n in ("aggregator", *NODES)}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "computing" not in _status_text(site, "split"):
        time.sleep(0.1)
    twin = site.start("site_b", "split", code=slow, **extra)
    started = twin.started
    everyone = {**processes, "site_b (second)": twin}
    codes = finish(everyone, timeout=60)
    took = max(p.ended or 0 for p in everyone.values()) - started
    ends = {n: round((p.ended or 0) - started, 1) for n, p in everyone.items()}
    assert all(code == 1 for code in codes.values()), {n: p.tail() for n, p in everyone.items()}
    aggregator = processes["aggregator"].stderr()
    assert "two processes claim node 'site_b' (instances " in aggregator, aggregator[-2000:]
    assert not list(site.results.rglob("result.bin")), "a split-brain run stored a result"
    print(f"\n  [auth] split brain: every process exited 1, {took:.1f} s after the second start"
          f" ({ends})")  # fmt: skip
    assert took < 10 + 5  # 10 s from detection, plus the second process's start-up


def _status_text(site: Site, analysis_id: str) -> str:
    client = site.broker.client(OPERATOR, site.broker.operator_password)
    seen: list[str] = []
    client.on_message = lambda c, u, m: seen.append(m.payload.decode(errors="replace"))
    client.subscribe(f"flame/{analysis_id}/+/status", qos=1)
    time.sleep(0.3)
    client.loop_stop()
    client.disconnect()
    return "\n".join(seen)

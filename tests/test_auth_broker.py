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
import sys
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

from flame.aggregator.run_store import code_hash
from flame.analysis.loader import load_analysis
from flame.identity import Identity, Member, Roster, write_identity
from flame.identity.broker_config import write_broker_config
from flame.identity.signing import sign_parts
from flame.wire.envelope import Envelope, encode_parts

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
        data = folder / "mosquitto-data"
        data.mkdir()
        self.files = write_broker_config(
            roster, folder / "broker", use_tool=use_tool, persistence=data
        )
        self.port = free_port()
        text = self.files.config.read_text()
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
            (folder / "data" / node / "x.csv").write_text("x\n" + "".join(f"{v}\n" for v in values))
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


def test_generated_acl_lets_only_the_aggregation_member_broadcast(tmp_path: Path) -> None:
    members = {"agg": "aggregation", "a": "analysis", "b": "analysis"}
    roster = Roster([Member(n, r, Identity.generate(n).public_text) for n, r in members.items()])
    broker = GeneratedBroker(tmp_path, roster, use_tool=False)
    clients: list[mqtt.Client] = []
    try:
        got: dict[str, list[bytes]] = {"a": [], "b": []}
        acks: list[Any] = []
        for user in ("a", "b"):
            client = broker.client(user)
            client.on_message = lambda c, u, m, user=user: got[user].append(m.payload)
            clients.append(client)
            client.subscribe("flame/x/broadcast", qos=1)
        aggregator = broker.client("agg")
        clients.append(aggregator)
        a = clients[0]
        a.on_publish = lambda c, u, mid, code, p: acks.append(code)
        time.sleep(0.5)
        aggregator.publish("flame/x/broadcast", b"kick-off", qos=1).wait_for_publish(5)
        a.publish("flame/x/broadcast", b"forged", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(got["b"]) < 1:
            time.sleep(0.05)
        time.sleep(0.5)
        assert got == {"a": [b"kick-off"], "b": [b"kick-off"]}
        assert acks and acks[0].is_failure, "an analysis member may not broadcast"
    finally:
        for client in clients:
            client.loop_stop()
            client.disconnect()
        broker.close()


# --- a whole run with the generated config ---------------------------------------------------


def test_signed_run_passes_with_the_generated_broker_config(site: Site) -> None:
    hashed = subprocess.run(
        [sys.executable, "-m", "flame", "hash", str(site.analysis)],
        capture_output=True, text=True, timeout=60, env=clean_env(), check=True,
    )  # fmt: skip
    approved = hashed.stdout.strip()
    assert approved == code_hash(load_analysis(site.analysis).functions)  # one file: the same
    # mallory is an analysis member outside this run: the broker ACL lets it read the
    # broadcast topic, so the aggregator sends each node its own copy instead
    broadcasts: list[bytes] = []
    spy = site.broker.client(OPERATOR, site.broker.operator_password)
    spy.on_message = lambda c, u, message: broadcasts.append(message.payload)
    spy.subscribe("flame/auth-run/broadcast", qos=1)
    time.sleep(0.3)
    processes = {
        node: site.start(node, "auth-run", FLAME_APPROVED_CODE=approved)
        for node in ("aggregator", *NODES)
    }
    codes = finish(processes)
    spy.loop_stop()
    spy.disconnect()
    assert broadcasts == []
    assert codes == {"aggregator": 0, "site_a": 0, "site_b": 0}, {
        n: p.tail() for n, p in processes.items()
    }
    for process in processes.values():
        assert process.value() == {"n": 5, "sum": 36.0}
    manifest = next(site.results.rglob("manifest.json"))
    assert json.loads(manifest.read_text())["roster_sha256"] == site.roster.fingerprint
    # flame status checks every retained status against the roster; the broker operator
    # can still overwrite one, and then it shows as not verified
    operator = site.broker.client(OPERATOR, site.broker.operator_password)
    forged = json.dumps({"state": "done", "role": "analysis", "epoch": 0}).encode()
    operator.publish("flame/auth-run/site_b/status", forged, qos=1, retain=True).wait_for_publish(5)
    operator.loop_stop()
    operator.disconnect()
    env = clean_env()
    env.update(
        FLAME_BROKER__URL=site.broker.url,
        FLAME_BROKER__USERNAME=OPERATOR,
        FLAME_BROKER__TOKEN=site.broker.operator_password,
        FLAME_ROSTER=str(site.roster_file),
    )
    shown = subprocess.run(
        [sys.executable, "-m", "flame", "status", "auth-run"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = {line.split()[0]: line for line in shown.stdout.splitlines() if line.startswith("  ")}
    assert "[signed, verified]" in lines["site_a"], shown.stdout + shown.stderr
    assert "[signed, verified]" in lines["aggregator"], shown.stdout
    assert "[NOT VERIFIED: bad or no signature]" in lines["site_b"], shown.stdout


def test_a_run_of_the_whole_roster_broadcasts_its_kick_offs(tmp_path: Path) -> None:
    """No analysis member outside the run: once the nodes said the aggregator's probe reached
    them (their next status after it, at most 0.25 s later), the kick-offs go once on the
    broadcast topic (the broker operator counts them), and the result is the same."""
    site = Site(tmp_path, {"aggregator": "aggregation", **{n: "analysis" for n in NODES}})
    slow = site.write_analysis("slow.py", delay=0.3)  # epochs outlast the status interval
    seen: list[str] = []
    operator = site.broker.client(OPERATOR, site.broker.operator_password)
    operator.on_message = lambda c, u, message: seen.append(message.topic)
    operator.subscribe("flame/bcast-run/#", qos=1)
    try:
        time.sleep(0.3)
        processes = {
            n: site.start(n, "bcast-run", code=slow, FLAME_EPOCHS=4) for n in ("aggregator", *NODES)
        }
        codes = finish(processes)
        assert codes == {"aggregator": 0, "site_a": 0, "site_b": 0}, {
            n: p.tail() for n, p in processes.items()
        }
        for process in processes.values():
            assert process.value() == {"n": 5, "sum": 36.0}
    finally:
        operator.loop_stop()
        operator.disconnect()
        site.close()
    # the probe with the start, then at least the last aggregate and the end
    assert seen.count("flame/bcast-run/broadcast") >= 3, seen


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


# --- code approval --------------------------------------------------------------------------


def test_unapproved_code_stops_the_node_before_the_data_api_is_asked(
    site: Site, data_api: Any
) -> None:
    """Exit 2 naming the hash it saw; the data source (a real HTTP data API) got no request."""
    from flame.analysis.code_hash import analysis_code_hash

    seen = analysis_code_hash(site.analysis)
    source = {"name": "files", "kind": "http", "url": data_api.files_url, "token": data_api.token}
    env = site.env(
        "site_a",
        "unapproved",
        FLAME_APPROVED_CODE="ab" * 32,
        FLAME_DATA=json.dumps([source]),
    )
    del env["FLAME_DATA_DIR"]
    data_api.reset()
    done = subprocess.run(
        [sys.executable, "-m", "flame", "run", str(site.analysis)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"this analysis code (SHA-256 {seen}) is not approved on node 'site_a'" in done.stderr
    assert "Traceback" not in done.stderr
    assert data_api.requests == []
    # the same node with the hash approved gets as far as the data API
    ok = subprocess.run(
        [sys.executable, "-m", "flame", "check"],
        env={**env, "FLAME_APPROVED_CODE": seen}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert data_api.requests, ok.stdout + ok.stderr


def test_a_node_running_other_code_aborts_the_run(site: Site) -> None:
    other = site.write_analysis("other.py", delay=0.01)  # one changed character
    processes = {
        "aggregator": site.start("aggregator", "mixed"),
        "site_a": site.start("site_a", "mixed"),
        "site_b": site.start("site_b", "mixed", code=other),
    }
    codes = finish(processes)
    assert codes == {"aggregator": 1, "site_a": 1, "site_b": 1}, {
        n: p.tail() for n, p in processes.items()
    }
    assert "node 'site_b' runs different analysis code" in processes["aggregator"].stderr()
    assert "node 'site_b' runs different analysis code" in processes["site_a"].stderr()
    assert not list(site.results.rglob("result.bin"))


# --- forged, relabelled and replayed decryption requests -------------------------------------

SECURE_ANALYSIS = """\
import flame

def analyze(data, epoch, previous):
    x = data.read_csv()["x"]
    return {"n": int(x.size), "total": flame.secure(float(x.sum()))}

def aggregate(results, epoch, previous):
    return {"n": sum(r["n"] for r in results.values()),
            "total": float(results.secure["total"])}
"""


def _decode(payload: bytes) -> Envelope | None:
    from flame.identity.signing import unwrap_unverified
    from flame.wire.envelope import decode

    try:
        return decode(unwrap_unverified(payload))
    except Exception:
        return None


def test_forged_and_replayed_decryption_requests_are_dropped(site: Site) -> None:
    """The issue's attack over the real broker: the broker operator replays the aggregator's
    decryption request; a roster member (mallory) sends a request 'from the aggregator' that
    relabels one node's ciphertext as a sum of two. Neither is answered; the run is right."""
    from flame.secure.fields import DECRYPT, DECRYPTED
    from flame.wire.envelope import Sealed

    keys = site.folder / "paillier"
    subprocess.run(
        [sys.executable, "-m", "flame", "keys", "generate", "--out", str(keys)],
        check=True, capture_output=True, timeout=120, env=clean_env(),
    )  # fmt: skip
    code = site.folder / "code" / "secure" / "secure.py"
    code.parent.mkdir(parents=True)
    code.write_text(SECURE_ANALYSIS)
    secure = {"FLAME_SECURE__ENABLED": "true", "FLAME_SECURE__MIN_CONTRIBUTORS": "2"}
    analysis = "forged"
    captured: dict[str, bytes] = {}
    decrypted_replies: list[str] = []
    injected: list[str] = []
    mallory = site.broker.client("mallory")
    operator = site.broker.client(OPERATOR, site.broker.operator_password)

    def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        envelope = _decode(message.payload)
        if envelope is None:
            return
        if envelope.kind == "result" and envelope.sender == "site_a":
            captured["result"] = bytes(message.payload)
        if envelope.kind != "message":
            return
        if envelope.category == DECRYPTED:
            decrypted_replies.append(envelope.sender)
        if envelope.category != DECRYPT or injected:
            return
        injected.append(envelope.recipient)
        topic = f"flame/{analysis}/{envelope.recipient}/inbox"
        # 1. the operator replays the aggregator's signed request, twice
        operator.publish(topic, message.payload, qos=1)
        operator.publish(topic, message.payload, qos=1)
        # 2. mallory relabels site_a's own ciphertext as a sum of site_a and site_b
        result = _decode(captured["result"])
        assert result is not None
        sealed = result.body["total"]
        assert isinstance(sealed, Sealed)
        forged = Envelope(
            analysis, "aggregator", "site_a", "message", envelope.epoch,
            {"sums": {"total": sealed}, "contributors": {"total": ["site_a", "site_b"]},
             "reporter": "site_a"},
            DECRYPT,
        )  # fmt: skip
        frame = b"".join(
            bytes(p) for p in sign_parts(site.identities["mallory"], encode_parts(forged))
        )
        mallory.publish(f"flame/{analysis}/site_a/inbox", frame, qos=1)

    operator.on_message = on_message
    operator.subscribe(f"flame/{analysis}/+/inbox", qos=1)
    time.sleep(0.3)
    try:
        processes = {
            "aggregator": site.start(
                "aggregator", analysis, code=code, **secure,
                FLAME_SECURE__PUBLIC_KEY_FILE=str(keys / "public_key.json"),
            ),
            **{
                node: site.start(
                    node, analysis, code=code, **secure,
                    FLAME_SECURE__PRIVATE_KEY_FILE=str(keys / "private_key.json"),
                )
                for node in NODES
            },
        }  # fmt: skip
        codes = finish(processes, timeout=120)
    finally:
        for client in (operator, mallory):
            client.loop_stop()
            client.disconnect()
    assert codes == {"aggregator": 0, "site_a": 0, "site_b": 0}, {
        n: p.tail() for n, p in processes.items()
    }
    assert processes["aggregator"].value() == {"n": 5, "total": 36.0}
    assert injected, "no decryption request was seen on the broker"
    site_a = processes["site_a"].stderr()
    assert "dropped a message claiming to be from 'aggregator'" in site_a, site_a[-2000:]
    assert "signed by 'mallory'" in site_a
    # one answer per node and request: the reporter's and the confirmer's, nothing more
    assert sorted(decrypted_replies) == ["site_a", "site_b"], decrypted_replies


# --- flame check ------------------------------------------------------------------------------


def test_check_isolation_probe_fails_on_an_open_broker_and_passes_with_the_acl(
    site: Site, tmp_path: Path
) -> None:
    from broker import Broker

    from flame.config import load_config
    from flame.ops.auth_checks import check_isolation

    good = load_config(
        analysis_id="iso",
        node_id="site_a",
        broker={"url": site.broker.url, "token_file": str(site.broker.files.tokens["site_a"])},
    )
    item = check_isolation(good, timeout=3)
    assert item.verdict == "ok", item.line()
    with Broker(tmp_path / "open", auth=False) as open_broker:  # anonymous, no ACL
        bad = load_config(analysis_id="iso", node_id="site_a", broker={"url": open_broker.url})
        item = check_isolation(bad, timeout=3)
    assert item.verdict == "FAIL", item.line()
    assert "read another node's inbox" in item.detail and "flame broker config" in item.fix


def test_check_warns_about_a_password_over_plain_mqtt_to_another_host() -> None:
    from flame.config import load_config
    from flame.ops.auth_checks import check_plain_password

    def warning(url: str, token: str | None = "secret-token") -> str | None:
        config = load_config(broker={"url": url, "token": token})
        item = check_plain_password(config)
        return None if item is None else item.line()

    line = warning("mqtt://broker.example:1883")
    assert line is not None and "unencrypted to broker.example" in line
    assert "secret-token" not in line
    assert warning("mqtts://broker.example:8883") is None
    assert warning("mqtt://127.0.0.1:1883") is None
    assert warning("mqtt://broker.example:1883", token=None) is None

"""Red team: hostile analysis code on a real node (`flame run` over a real Mosquitto).

The threat: the analyst's `analyze` is attacker code. It runs in the node's isolated child
(no secrets in its environment, no network), but it is a process of the same user on the same
machine. Whatever it can read, it can put in its result, and the result goes to the aggregator
(the analyst). Each probe below is something such code tries; the federation runs once and
every test asserts one defence on what reached the aggregator or on the node's disk.
"""

from __future__ import annotations

import json
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, have_mosquitto
from nodes import Federation, federation_env

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")

NODE = "node-0"

HOSTILE = r"""
import json, os, socket
import flame

TARGETS = json.loads(%(targets)r)

def _hex(data):
    return data.hex() if isinstance(data, bytes) else data.encode().hex()

def _try(what, fn):
    try:
        return {"ok": True, "value": fn()}
    except BaseException as exc:  # the attacker records what stopped it
        return {"ok": False, "error": type(exc).__name__}

def _read(path):
    with open(path, "rb") as stream:
        return _hex(stream.read())

def _parent_memory(pid, needle):
    found = False
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            parts = line.split()
            if len(parts) < 2 or "r" not in parts[1][:1]:
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if end - start > 64 * 1024 * 1024:
                continue
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except OSError:
                continue
            if needle in chunk:
                found = True
                break
    return found

def _other_processes(needle):
    hits = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as stream:
                if needle in stream.read():
                    hits.append(int(name))
        except OSError:
            pass
    return hits

def _parent_fds(ppid):
    opened = []
    for fd in os.listdir(f"/proc/{ppid}/fd"):
        try:
            with open(f"/proc/{ppid}/fd/{fd}", "rb") as stream:
                opened.append(_hex(stream.read(256)))
        except OSError:
            pass
    return opened

def _unlink(path):
    os.remove(path)
    return True

def _overwrite(path):
    with open(path, "w") as stream:
        stream.write("{}")
    return True

def _connect(port):
    socket.create_connection(("127.0.0.1", port), timeout=3).close()
    return True

def _connect_unix(path):
    client = socket.socket(socket.AF_UNIX)
    client.settimeout(3)
    client.connect(path)
    client.close()
    return True

def analyze(data, epoch, previous):
    ppid = os.getppid()
    needle = TARGETS["token"].encode()
    probes = {
        "parent_environ": _try("environ", lambda: _read(f"/proc/{ppid}/environ")),
        "parent_memory": _try("mem", lambda: _parent_memory(ppid, needle)),
        "other_processes": _try("others", lambda: _other_processes(needle)),
        "parent_fds": _try("fds", lambda: _parent_fds(ppid)),
        "token_file": _try("token", lambda: _read(TARGETS["token_file"])),
        "policy_overwrite": _try("policy", lambda: _overwrite(TARGETS["policy"])),
        "ledger_unlink": _try("ledger", lambda: _unlink(TARGETS["ledger"])),
        "broker_connect": _try("net", lambda: _connect(TARGETS["broker_port"])),
        "data_direct": _try("data", lambda: _read(TARGETS["data_file"])),
        "unix_socket": _try("unix", lambda: _connect_unix(TARGETS["unix_socket"])),
        "identity_key": _try("identity", lambda: _read(TARGETS["identity_key"])),
        "roster_overwrite": _try("roster", lambda: _overwrite(TARGETS["roster"])),
    }
    legit = {
        "read_csv": len(data.read_csv()["v"]),
        "table": data.table().num_rows,
        "sql": data.sql("select count(*) as n from x").column("n")[0].as_py(),
    }
    return {"legit": legit, "probes": json.dumps(probes)}

def aggregate(results, epoch, previous):
    return {node: {**json.loads(r["probes"]), "legit": r["legit"]} for node, r in results.items()}
"""


@pytest.fixture(scope="module")
def hostile_run(
    mqtt_broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """One real run whose analysis tries every probe; what the aggregator received."""
    root = tmp_path_factory.mktemp("hostile")
    secrets = root / "secrets"
    secrets.mkdir()
    token_file = secrets / "broker_token"
    token_file.write_text(mqtt_broker.password)
    token_file.chmod(0o600)
    ledger_dir = secrets / "ledger"
    ledger_dir.mkdir()
    ledger = ledger_dir / f"{NODE}--default.json"
    entries = [{"analysis": "earlier", "epoch": 0, "epsilon": 0.9, "delta": 0.0, "time": 0}]
    ledger.write_text(json.dumps({"scope": "default", "node": NODE, "entries": entries}))
    policy = secrets / "policy.toml"
    policy.write_text(f'epsilon_budget = 1.0\nledger_dir = "{ledger_dir}"\nmin_rows = 1\n')
    data = root / "data"
    (data / NODE).mkdir(parents=True)
    data_file = data / NODE / "x.csv"
    data_file.write_text("v\n1\n2\n3\n")
    targets = {
        "token": mqtt_broker.password,
        "token_file": str(token_file),
        "policy": str(policy),
        "ledger": str(ledger),
        "broker_port": mqtt_broker.port,
        "data_file": str(data_file),
    }
    service = socket.socket(socket.AF_UNIX)  # a local service (database, engine, broker)
    service.bind(str(root / "service.sock"))
    service.listen(4)
    targets["unix_socket"] = str(root / "service.sock")
    env = federation_env(mqtt_broker, "redteam-isolation", [NODE])
    keys = env.get("TEST_FLAME_IDENTITY_DIR")  # tests/nodes.py: identities, once auth is in
    targets["identity_key"] = str(Path(keys) / f"{NODE}.key") if keys else ""
    targets["roster"] = env.get("FLAME_ROSTER", "")
    analysis = root / "hostile.py"
    analysis.write_text(textwrap.dedent(HOSTILE % {"targets": json.dumps(targets)}))
    env.pop("FLAME_BROKER__TOKEN")
    env["FLAME_BROKER__TOKEN_FILE"] = str(token_file)
    federation = Federation(env, analysis, data, [NODE], root / "logs")
    try:
        federation.start("aggregator")
        federation.start(NODE, FLAME_POLICY=str(policy))
        values = federation.finish(timeout=180)
        probes = values["aggregator"][NODE]
        yield {
            "probes": probes,
            "token": mqtt_broker.password,
            "ledger": ledger,
            "ledger_text": json.dumps({"scope": "default", "node": NODE, "entries": entries}),
            "policy": policy,
            "wire": json.dumps(values["aggregator"]),
            "identity_key": targets["identity_key"],
            "roster": targets["roster"],
        }
    finally:
        federation.close()
        service.close()


def _leaked(run: dict[str, Any], probe: str) -> bool:
    """Did the probe bring back the token (hex-encoded, as the attacker sent it)?"""
    outcome = run["probes"][probe]
    return outcome["ok"] and run["token"].encode().hex() in json.dumps(outcome["value"])


def test_child_cannot_read_the_parents_environment(hostile_run: dict[str, Any]) -> None:
    assert not hostile_run["probes"]["parent_environ"]["ok"]


def test_child_cannot_read_the_parents_memory(hostile_run: dict[str, Any]) -> None:
    outcome = hostile_run["probes"]["parent_memory"]
    assert not (outcome["ok"] and outcome["value"]), outcome


def test_child_finds_no_secret_in_other_processes_environment(
    hostile_run: dict[str, Any],
) -> None:
    outcome = hostile_run["probes"]["other_processes"]
    assert not (outcome["ok"] and outcome["value"]), outcome


def test_child_cannot_reopen_the_parents_files(hostile_run: dict[str, Any]) -> None:
    outcome = hostile_run["probes"]["parent_fds"]
    assert not (outcome["ok"] and outcome["value"]), outcome


def test_child_cannot_read_the_nodes_token_file(hostile_run: dict[str, Any]) -> None:
    assert not _leaked(hostile_run, "token_file")
    assert not hostile_run["probes"]["token_file"]["ok"]


def test_child_cannot_rewrite_the_node_policy(hostile_run: dict[str, Any]) -> None:
    assert not hostile_run["probes"]["policy_overwrite"]["ok"]
    assert "epsilon_budget = 1.0" in hostile_run["policy"].read_text()


def test_child_cannot_reset_the_privacy_budget_ledger(hostile_run: dict[str, Any]) -> None:
    assert not hostile_run["probes"]["ledger_unlink"]["ok"]
    assert json.loads(hostile_run["ledger"].read_text())["entries"][0]["epsilon"] == 0.9


def test_child_cannot_reach_the_broker(hostile_run: dict[str, Any]) -> None:
    assert not hostile_run["probes"]["broker_connect"]["ok"]


def test_child_cannot_connect_to_a_local_unix_socket(hostile_run: dict[str, Any]) -> None:
    """A database, container engine or broker listening on a socket file of the node."""
    assert not hostile_run["probes"]["unix_socket"]["ok"]


def test_child_reads_data_only_through_the_metered_runtime(hostile_run: dict[str, Any]) -> None:
    assert not hostile_run["probes"]["data_direct"]["ok"]


def test_legitimate_reads_still_work_in_the_confined_child(hostile_run: dict[str, Any]) -> None:
    assert hostile_run["probes"]["legit"] == {"read_csv": 3, "table": 3, "sql": 3}


def test_the_token_never_reaches_the_aggregator(hostile_run: dict[str, Any]) -> None:
    assert hostile_run["token"].encode().hex() not in hostile_run["wire"]


def test_child_cannot_read_the_nodes_identity_key(hostile_run: dict[str, Any]) -> None:
    """With it, the analyst could sign as this node: Sybil results, forged statuses."""
    if not hostile_run["identity_key"]:
        pytest.skip("no identities in this federation (roster support not present)")
    assert Path(hostile_run["identity_key"]).is_file()
    assert not hostile_run["probes"]["identity_key"]["ok"]


def test_child_cannot_rewrite_the_roster(hostile_run: dict[str, Any]) -> None:
    if not hostile_run["roster"]:
        pytest.skip("no roster in this federation (roster support not present)")
    assert not hostile_run["probes"]["roster_overwrite"]["ok"]
    assert "member" in Path(hostile_run["roster"]).read_text()

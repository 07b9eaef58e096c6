"""`flame check` against real services: a broker, an HTTP data API and an S3 server."""

from __future__ import annotations

import json
import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from broker import ADMIN, Broker
from identities import federation
from servers.fhir_server import DataApiServer
from servers.s3_server import S3Server, free_port

from flame.cli import main
from flame.ops.check import CheckItem, run_checks

USERS = (ADMIN, "aggregator", "clinic-a", "clinic-b", "watcher")
FAR = int(time.time()) + 24 * 3600


def _jwt(exp: int) -> str:
    key = "a-signing-key-this-check-never-verifies"
    return jwt.encode({"sub": "clinic-a", "exp": exp}, key, algorithm="HS256")


@pytest.fixture(autouse=True)
def _installation_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests count the config/service items; the installation items (writable runtime
    code, Landlock) depend on the machine and have their own tests (test_check_install)."""
    monkeypatch.setattr("flame.ops.check_install.install_checks", lambda config: [])


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with Broker(users=USERS) as running:
        yield running


@pytest.fixture(scope="module")
def s3(s3_server: S3Server) -> S3Server:
    """The session's S3 server (tests/servers/plugin.py)."""
    return s3_server


@pytest.fixture(scope="module")
def data_api() -> Iterator[DataApiServer]:
    with DataApiServer(token=_jwt(FAR)) as server:
        yield server


@pytest.fixture
def node_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, broker: Broker) -> Path:
    """A valid analysis node: broker, a local data folder; nothing else configured yet."""
    for name in list(os.environ):
        if name.startswith("FLAME_"):
            monkeypatch.delenv(name)
    data = tmp_path / "data"
    data.mkdir()
    (data / "values.csv").write_text("value\n1\n")
    for name, value in {
        "FLAME_ANALYSIS_ID": "check-test",
        "FLAME_NODE_ID": "clinic-a",
        "FLAME_ROLE": "analysis",
        "FLAME_PARTICIPANTS": "clinic-a,clinic-b",
        "FLAME_BROKER__URL": broker.url,
        "FLAME_BROKER__TOKEN": broker.password,
        "FLAME_DATA_DIR": str(data),
        **federation(tmp_path / "identities", ["clinic-a", "clinic-b"])["clinic-a"],
    }.items():
        monkeypatch.setenv(name, value)
    return data


def _data_source(monkeypatch: pytest.MonkeyPatch, api: DataApiServer, token: str) -> None:
    source = {"name": "files", "kind": "http", "url": api.files_url, "token": token}
    monkeypatch.setenv("FLAME_DATA", json.dumps([source]))


def _storage(monkeypatch: pytest.MonkeyPatch, s3: S3Server, bucket: str) -> None:
    for key, value in s3.settings(bucket=bucket).items():
        monkeypatch.setenv(f"FLAME_STORAGE__{key.upper()}", str(value))


def _check(capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    code = main(["check", "--timeout", "3"])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def _retained(broker: Broker, timeout: float = 1.0) -> list[str]:
    """Every retained topic on the broker (what a check must not have left behind)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    seen: queue.Queue[str] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-retained")
    if broker.auth:
        client.username_pw_set(ADMIN, broker.password)
    client.on_message = lambda _c, _u, m: seen.put(m.topic) if m.retain else None
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.subscribe("#", qos=1)
    time.sleep(timeout)
    client.disconnect()
    client.loop_stop()
    return sorted(seen.queue)


def test_wrong_endpoint_and_expired_token_are_exactly_the_two_failures(
    node_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    broker: Broker,
    data_api: DataApiServer,
) -> None:
    expired = _jwt(int(time.time()) - 3600)
    _data_source(monkeypatch, data_api, expired)
    dead = free_port()  # nothing listens here: the wrong endpoint
    monkeypatch.setenv("FLAME_STORAGE__ENDPOINT", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("FLAME_STORAGE__ACCESS_KEY", "key")
    monkeypatch.setenv("FLAME_STORAGE__SECRET_KEY", "secret-value-1")
    before = len(data_api.requests)

    code, lines, err = _check(capsys)

    assert code == 1
    failed = [line for line in lines if line.startswith("FAIL")]
    assert len(failed) == 2, lines
    assert failed[0].startswith("FAIL token data API 'files': token expired at ")
    assert "renew the token" in failed[0]
    assert failed[1] == (
        f"FAIL storage http://127.0.0.1:{dead}/flame: connection refused "
        "\u2014 check FLAME_STORAGE__ENDPOINT"
    )
    assert lines[0].startswith("ok   config: analysis check-test, node clinic-a, role analysis")
    assert any(line.startswith(f"ok   broker mqtt://{broker.host}:{broker.port}") for line in lines)
    assert f"ok   data folder {node_env}: 1 file" in lines
    # the source whose token failed is not contacted, and says so without failing twice
    skipped = (
        f"skip data source 'files' {data_api.files_url.rstrip('/')}: not tried: its token failed"
    )
    assert skipped in lines
    assert len(data_api.requests) == before
    assert "2 of" in err
    for secret in (expired, broker.password, "secret-value-1"):
        assert secret not in "\n".join(lines) + err


def test_everything_reachable_passes_and_nothing_is_written(
    node_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    broker: Broker,
    data_api: DataApiServer,
    s3: S3Server,
) -> None:
    s3.client().make_bucket("flame-check-ok")
    _storage(monkeypatch, s3, "flame-check-ok")
    _data_source(monkeypatch, data_api, data_api.token or "")
    files_before = sorted(p.name for p in node_env.iterdir())

    code, lines, _ = _check(capsys)

    assert code == 0, lines
    assert [line.split()[0] for line in lines] == ["ok"] * len(lines)
    assert [line.split()[1].rstrip(":") for line in lines] == [
        "config", "token", "token", "broker", "roster", "identity", "inbox", "data", "data",
        "storage", "policy",
    ]  # fmt: skip
    assert "ok   token broker: opaque token (not a JWT; nothing to check)" in lines
    assert any(
        line.startswith("ok   token data API 'files': JWT not signature-checked") for line in lines
    )
    assert f"ok   storage http://{s3.endpoint}/flame-check-ok" in lines
    assert list(s3.client().list_objects("flame-check-ok", recursive=True)) == []
    assert sorted(p.name for p in node_env.iterdir()) == files_before
    assert _retained(broker) == []


def test_a_missing_bucket_is_not_created(
    node_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    s3: S3Server,
) -> None:
    _storage(monkeypatch, s3, "flame-not-there")
    code, lines, _ = _check(capsys)
    assert code == 0
    assert any("bucket does not exist yet" in line for line in lines)
    assert not s3.client().bucket_exists("flame-not-there")


def test_a_rejected_broker_password(
    node_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    broker: Broker,
) -> None:
    if not broker.auth:
        pytest.skip("the amqtt fallback broker does not check passwords")
    monkeypatch.setenv("FLAME_BROKER__TOKEN", "not-the-password")
    code, lines, _ = _check(capsys)
    assert code == 1
    [failed] = [line for line in lines if line.startswith("FAIL")]
    assert failed.startswith(f"FAIL broker mqtt://{broker.host}:{broker.port}: connection refused")
    assert "not authorized" in failed
    assert "FLAME_BROKER__TOKEN" in failed
    assert "not-the-password" not in "\n".join(lines)


def test_an_unreachable_broker(
    node_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    monkeypatch.setenv("FLAME_BROKER__URL", f"mqtt://127.0.0.1:{port}")
    code, lines, _ = _check(capsys)
    assert code == 1
    assert (
        f"FAIL broker mqtt://127.0.0.1:{port}: connection refused \u2014 check FLAME_BROKER__URL"
        in lines
    )


def test_config_errors_are_listed_and_stop_the_rest(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("FLAME_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FLAME_EPOCHS", "abc")
    monkeypatch.setenv("FLAME_QUORUM", "0")
    code, lines, _ = _check(capsys)
    assert code == 1
    assert len(lines) == 2
    assert all(line.startswith("FAIL config: FLAME_") for line in lines)


def test_missing_node_settings_fail_but_services_are_still_checked(
    node_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLAME_ROLE")
    report = run_checks(timeout=3)
    assert [item.name for item in report.failed] == ["config"]
    assert "FLAME_ROLE" in report.failed[0].detail
    assert any(item.name == "broker" and item.verdict == "ok" for item in report.items)


def test_line_format() -> None:
    assert CheckItem("ok", "broker", "mqtt://h:1883").line() == "ok   broker mqtt://h:1883"
    assert (
        CheckItem("FAIL", "storage", "http://s:9000", "connection refused", "check X").line()
        == "FAIL storage http://s:9000: connection refused \u2014 check X"
    )
    assert CheckItem("ok", "x", detail="d", fix="ignored when ok").line() == "ok   x: d"


def test_secure_aggregation_keys_must_parse_and_match(
    node_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from flame.protocols.paillier import write_keypair

    public, _ = write_keypair(tmp_path / "pair_a")
    _, other_private = write_keypair(tmp_path / "pair_b")
    monkeypatch.setenv("FLAME_SECURE__ENABLED", "true")
    monkeypatch.setenv("FLAME_SECURE__PUBLIC_KEY_FILE", str(public))
    monkeypatch.setenv("FLAME_SECURE__PRIVATE_KEY_FILE", str(other_private))
    report = run_checks(timeout=3)
    [failed] = report.failed
    assert failed.name == "secure private key"
    assert "not to the public key" in failed.detail
    secret_p = json.loads(other_private.read_text())["p"]
    assert str(other_private) in failed.line() and secret_p not in failed.line()
    # the aggregator is checked for the public key only: it must never hold the private one
    monkeypatch.setenv("FLAME_ROLE", "aggregation")
    monkeypatch.setenv("FLAME_NODE_ID", "aggregator")
    keys = Path(os.environ["FLAME_IDENTITY__KEY_FILE"]).parent
    monkeypatch.setenv("FLAME_IDENTITY__KEY_FILE", str(keys / "aggregator.key"))
    report = run_checks(timeout=3)
    assert report.ok, [item.line() for item in report.items]
    assert not any("private" in item.name for item in report.items)

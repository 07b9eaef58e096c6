"""`flame check`: can this node run? Config, tokens, broker, data sources and storage.

An operator runs it before a run (or when one failed) on the node itself, with the node's
own settings. Each item gets one verdict with a reason and the setting to fix, so a wrong
endpoint or an expired token is found in seconds instead of after the presence timeout.
It only reads: it publishes nothing, creates no bucket and writes no file.

A service whose token failed is not contacted: the connection would fail for the same
reason and the operator would see one problem twice.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from flame.config import BrokerSettings, DataSourceSettings, FlameConfig, load_config
from flame.errors import ConfigError, FlameError
from flame.utils.logs import mask_credentials

__all__ = [
    "BrokerUnavailable",
    "CheckItem",
    "CheckReport",
    "broker_address",
    "broker_username",
    "connect_broker",
    "run_checks",
]

Verdict = Literal["ok", "FAIL", "skip"]


@dataclass(frozen=True)
class CheckItem:
    """One line of the report."""

    verdict: Verdict
    name: str
    target: str = ""
    detail: str = ""
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict != "FAIL"

    def line(self) -> str:
        text = f"{self.verdict:<4} {self.name}"
        if self.target:
            text += f" {self.target}"
        if self.detail:
            text += f": {self.detail}"
        if self.fix and self.verdict == "FAIL":
            text += f" \u2014 {self.fix}"
        return text


@dataclass
class CheckReport:
    items: list[CheckItem] = field(default_factory=list)

    @property
    def failed(self) -> list[CheckItem]:
        return [item for item in self.items if item.verdict == "FAIL"]

    @property
    def ok(self) -> bool:
        return not self.failed


class BrokerUnavailable(FlameError):
    """The broker could not be reached or refused this node; `fix` names the setting."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


# ------------------------------------------------------------------------- network helpers


def _socket_reason(exc: BaseException, timeout: float) -> str:
    """Why a connection failed, in the words an operator searches for."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "host not found"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or type(exc).__name__})"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the server"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


def _tcp_reachable(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection opens, else the reason it did not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return _socket_reason(exc, timeout)


def broker_address(url: str) -> tuple[str, int, bool, str]:
    """(host, port, tls, protocol) as the MQTT transport reads the URL; ConfigError if bad."""
    from flame.clients.message_broker_client import parse_broker_url

    try:
        address = parse_broker_url(url)
    except ValueError as exc:
        raise ConfigError(f"FLAME_BROKER__URL / broker.url: {exc}") from None
    return address.host, address.port, address.tls, address.protocol


def _public_url(url: str) -> str:
    """The URL without user info, so a password in it never reaches the screen."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=host).geturl()


_CONNACK_FIXES = {
    "bad user name or password": "check FLAME_BROKER__USERNAME and FLAME_BROKER__TOKEN(_FILE)",
    "not authorized": "check FLAME_BROKER__USERNAME and FLAME_BROKER__TOKEN(_FILE)",
}


def connect_broker(
    settings: BrokerSettings,
    *,
    timeout: float,
    client_id: str | None = None,
    username: str | None = None,
    token: str | None = None,
    on_message: Callable[[Any, Any, Any], None] | None = None,
) -> Any:
    """A connected paho client (network loop running) or `BrokerUnavailable`.

    The protocol is the one the node's transport would use; the session is clean (MQTT 5:
    clean start, no expiry) so nothing stays behind on the broker. Stop it with `_stop`.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    if settings.url is None:
        raise BrokerUnavailable("no broker configured", "set FLAME_BROKER__URL")
    host, port, tls, protocol = broker_address(settings.url)
    v5 = protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"flame-{uuid.uuid4().hex[:12]}",
        clean_session=None if v5 else True,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        reconnect_on_failure=False,
    )
    client.connect_timeout = timeout
    if username is not None or token is not None:
        client.username_pw_set(username or "", token)
    if tls:
        try:
            client.tls_set(
                ca_certs=str(settings.ca_file) if settings.ca_file else None,
                certfile=str(settings.cert_file) if settings.cert_file else None,
                keyfile=str(settings.key_file) if settings.key_file else None,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise BrokerUnavailable(
                f"TLS files unusable ({_socket_reason(exc, timeout)})",
                "check FLAME_BROKER__CA_FILE / __CERT_FILE / __KEY_FILE",
            ) from None
    answered = threading.Event()
    outcome: dict[str, Any] = {}

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        outcome["reason"] = reason
        answered.set()

    client.on_connect = on_connect
    if on_message is not None:
        client.on_message = on_message
    try:
        if v5:
            client.connect(host, port, keepalive=max(10, int(timeout * 4)), clean_start=True)
        else:
            client.connect(host, port, keepalive=max(10, int(timeout * 4)))
    except (OSError, ssl.SSLError) as exc:
        raise BrokerUnavailable(_socket_reason(exc, timeout), "check FLAME_BROKER__URL") from None
    client.loop_start()
    if not answered.wait(timeout):
        _stop(client)
        raise BrokerUnavailable(
            f"no MQTT answer within {timeout:g} s (is it an MQTT port?)", "check FLAME_BROKER__URL"
        )
    reason = outcome["reason"]
    if getattr(reason, "is_failure", False):
        _stop(client)
        text = str(reason).lower()
        fix = _CONNACK_FIXES.get(text, "check the broker's settings for this node")
        if text == "not authorized":
            text = "not authorized: bad user name or password, or this user may not connect"
        raise BrokerUnavailable(f"connection refused by the broker ({text})", fix)
    return client


def broker_username(settings: BrokerSettings, node_id: str | None, token: str | None) -> str | None:
    """The user name the node's transport presents: configured, else the node id with a token."""
    if settings.username is not None:
        return settings.username
    return node_id if token is not None else None


def _stop(client: Any) -> None:
    try:
        client.disconnect()
    finally:
        client.loop_stop()


# ----------------------------------------------------------------------------- the checks


def _token_fix(service: str) -> str:
    if service == "broker":
        return "renew FLAME_BROKER__TOKEN (or the file FLAME_BROKER__TOKEN_FILE names)"
    if service == "storage":
        return "renew FLAME_STORAGE__TOKEN (or the file FLAME_STORAGE__TOKEN_FILE names)"
    return f"renew the token of {service} (its token / token_file in the data sources)"


def _check_config(report: CheckReport) -> FlameConfig | None:
    try:
        config = load_config()
    except ConfigError as exc:
        for line in str(exc).splitlines() or ["invalid configuration"]:
            report.items.append(CheckItem("FAIL", "config", detail=line))
        return None
    problems: list[str] = []
    try:
        from flame.main import _require

        _require(config)
    except ConfigError as exc:
        problems = str(exc).splitlines()
    for line in problems:
        report.items.append(CheckItem("FAIL", "config", detail=line))
    if not problems:
        summary = (
            f"analysis {config.analysis_id}, node {config.node_id}, role {config.role}, "
            f"{len(config.participants)} participants, aggregator {config.aggregator_id}"
        )
        source = os.environ.get("FLAME_CONFIG")
        report.items.append(
            CheckItem("ok", "config", detail=summary + (f" (file {source})" if source else ""))
        )
    return config


def _check_tokens(config: FlameConfig, report: CheckReport) -> set[str]:
    from flame.clients.token import TokenError, check_settings_token, service_tokens

    failed: set[str] = set()
    for service, settings in service_tokens(config):
        try:
            info = check_settings_token(settings, service)
        except TokenError as exc:
            failed.add(service)
            report.items.append(
                CheckItem("FAIL", f"token {service}", detail=exc.reason, fix=_token_fix(service))
            )
            continue
        if info.kind != "none":
            detail = str(info).removeprefix(f"{service}: ")
            report.items.append(CheckItem("ok", f"token {service}", detail=detail))
    return failed


def _check_broker(config: FlameConfig, failed_tokens: set[str], timeout: float) -> CheckItem:
    from flame.clients.token import TokenSource

    settings = config.broker
    assert settings.url is not None
    target = _public_url(settings.url)
    if "broker" in failed_tokens:
        return CheckItem("skip", "broker", target, "not tried: its token failed")
    try:
        token = TokenSource(settings, "broker").get()
        client = connect_broker(
            settings,
            timeout=timeout,
            client_id=_check_client_id(config),
            username=broker_username(settings, config.node_id, token),
            token=token,
        )
    except BrokerUnavailable as exc:
        return CheckItem("FAIL", "broker", target, exc.reason, exc.fix)
    except FlameError as exc:
        return CheckItem("FAIL", "broker", target, str(exc))
    _stop(client)
    return CheckItem("ok", "broker", target)


def _check_client_id(config: FlameConfig) -> str:
    # never the node's own client id: the broker would drop the running node's session
    return f"flame-check-{config.node_id or 'node'}-{uuid.uuid4().hex[:8]}"


def _host_port(url: str, default_secure: bool = True) -> tuple[str, int, str]:
    text = url if "://" in url else f"{'https' if default_secure else 'http'}://{url}"
    parts = urlsplit(text)
    secure = parts.scheme == "https"
    default = 5432 if parts.scheme in ("postgresql", "postgres") else 443 if secure else 80
    return parts.hostname or "", parts.port or default, text.rstrip("/")


def _check_data_dir(path: Path) -> CheckItem:
    if not path.is_dir():
        return CheckItem("FAIL", "data folder", str(path), "does not exist", "check FLAME_DATA_DIR")
    try:
        count = sum(1 for p in path.rglob("*") if p.is_file())
    except OSError as exc:
        return CheckItem(
            "FAIL", "data folder", str(path), exc.strerror or "unreadable", "check FLAME_DATA_DIR"
        )
    if not count:
        return CheckItem("FAIL", "data folder", str(path), "holds no files", "check FLAME_DATA_DIR")
    return CheckItem("ok", "data folder", str(path), f"{count} file{'s' if count != 1 else ''}")


def _check_source(source: DataSourceSettings, failed_tokens: set[str], timeout: float) -> CheckItem:
    from flame.clients.token import TokenError, source_service_name

    name = f"data source {source.name!r}"
    fix = f"check the url of data source {source.name!r} (data list in FLAME_CONFIG / FLAME_DATA)"
    if source.kind == "local":
        return (
            _check_data_dir(source.path)
            if source.path
            else CheckItem("FAIL", name, detail="kind local needs a path", fix=fix)
        )
    if not source.url:
        return CheckItem("FAIL", name, detail=f"kind {source.kind} needs a url", fix=fix)
    host, port, target = _host_port(source.url, default_secure=True)
    if source_service_name(source.name) in failed_tokens:
        return CheckItem("skip", name, _public_url(target), "not tried: its token failed")
    unreachable = _tcp_reachable(host, port, timeout)
    if unreachable:
        return CheckItem("FAIL", name, _public_url(target), unreachable, fix)
    from flame.data.sources import open_source

    quick = source.model_copy(update={"retries": 0, "timeout": min(timeout, source.timeout)})
    try:
        handle = open_source(quick)
        try:
            handle.probe()  # type: ignore[attr-defined]
        finally:
            close = getattr(handle, "close", None)
            if callable(close):
                close()
    except TokenError as exc:
        return CheckItem("FAIL", name, _public_url(target), exc.reason, _token_fix(exc.service))
    except FlameError as exc:
        return CheckItem("FAIL", name, _public_url(target), str(exc), fix)
    return CheckItem("ok", name, _public_url(target))


def _check_storage(config: FlameConfig, failed_tokens: set[str], timeout: float) -> CheckItem:
    from flame.clients.object_store import StorageError
    from flame.clients.token import TokenError

    settings = config.storage
    if settings.endpoint is None:
        assert settings.results_dir is not None
        folder = settings.results_dir
        existing = folder if folder.exists() else folder.parent
        if not os.access(existing, os.W_OK | os.X_OK):
            return CheckItem(
                "FAIL", "storage", str(folder), "not writable", "check FLAME_STORAGE__RESULTS_DIR"
            )
        from flame.ops.capacity import capacity_problem

        full = capacity_problem(existing, int(settings.min_free_mb * 1024 * 1024))
        if full is not None:
            fix = "free space there, or check FLAME_STORAGE__RESULTS_DIR / __MIN_FREE_MB"
            return CheckItem("FAIL", "storage", str(folder), full, fix)
        note = "" if folder.exists() else "will be created"
        return CheckItem("ok", "storage", str(folder), note)
    host, port, target = _host_port(settings.endpoint, settings.secure)
    target = f"{_public_url(target)}/{settings.bucket}"
    if "storage" in failed_tokens:
        return CheckItem("skip", "storage", target, "not tried: its token failed")
    fix = "check FLAME_STORAGE__ENDPOINT"
    unreachable = _tcp_reachable(host, port, timeout)
    if unreachable:
        return CheckItem("FAIL", "storage", target, unreachable, fix)
    from flame.clients.minio_client import MinioStore

    quick = settings.model_copy(update={"timeout": min(timeout, settings.timeout)})
    try:
        MinioStore.from_settings(quick).probe()
    except TokenError as exc:
        return CheckItem(
            "FAIL",
            "storage",
            target,
            exc.reason,
            "check FLAME_STORAGE__ACCESS_KEY / __SECRET_KEY / __TOKEN",
        )
    except StorageError as exc:
        text = str(exc)
        if "does not exist" in text and "bucket" in text:
            return CheckItem("ok", "storage", target, "bucket does not exist yet (created at run)")
        return CheckItem("FAIL", "storage", target, text, fix + " and FLAME_STORAGE__SECURE")
    return CheckItem("ok", "storage", target)


def _check_keys(config: FlameConfig) -> list[CheckItem]:
    """Parse the key files as the run will (public: aggregator and nodes; private: nodes) and
    check that the two belong together, so a wrong mount fails here, not in epoch 0."""
    from flame.protocols.paillier import (
        SecureAggregationError,
        key_id,
        load_private_key,
        load_public_key,
    )

    secure = config.secure
    items: list[CheckItem] = []
    public_id: str | None = None
    variable = "FLAME_SECURE__PUBLIC_KEY_FILE"
    if secure.public_key_file is None:
        items.append(
            CheckItem("FAIL", "secure public key", detail="not configured", fix=f"set {variable}")
        )
    else:
        try:
            public_id = key_id(load_public_key(secure.public_key_file))
        except SecureAggregationError as exc:
            items.append(
                CheckItem("FAIL", "secure public key", detail=str(exc), fix=f"check {variable}")
            )
        else:
            items.append(
                CheckItem(
                    "ok", "secure public key", str(secure.public_key_file), f"key id {public_id}"
                )
            )
    if config.role != "analysis":
        return items  # the aggregator must never hold the private key
    variable = "FLAME_SECURE__PRIVATE_KEY_FILE"
    if secure.private_key_file is None:
        items.append(
            CheckItem("FAIL", "secure private key", detail="not configured", fix=f"set {variable}")
        )
        return items
    try:
        private_id = key_id(load_private_key(secure.private_key_file).public_key)
    except SecureAggregationError as exc:
        items.append(
            CheckItem("FAIL", "secure private key", detail=str(exc), fix=f"check {variable}")
        )
        return items
    if public_id is not None and private_id != public_id:
        items.append(
            CheckItem(
                "FAIL",
                "secure private key",
                str(secure.private_key_file),
                f"belongs to key {private_id}, not to the public key {public_id}",
                "mount the key pair from the same `flame keys generate`",
            )
        )
    else:
        items.append(CheckItem("ok", "secure private key", str(secure.private_key_file)))
    return items


def _check_policy(config: FlameConfig) -> CheckItem:
    """The node policy in force, one line: the rules and what is left of the budget."""
    from flame.privacy.policy import load_policy
    from flame.privacy.release import Gate

    try:
        policy = load_policy(config.policy)
    except ConfigError as exc:
        return CheckItem("FAIL", "policy", str(config.policy), str(exc), "fix FLAME_POLICY's file")
    rules = {k: v for k, v in policy.summary().items() if v is not None and k != "ledger_dir"}
    detail = " ".join(f"{k}={v}" for k, v in rules.items())
    if policy.epsilon_budget is not None:
        try:
            gate = Gate(policy, node_id=config.node_id or "node", analysis_id=config.analysis_id)
            assert gate.ledger is not None
            left = gate.ledger.remaining()
            detail += f"; left: epsilon {left.epsilon:g}, delta {left.delta:g}"
            detail += f" (ledger {gate.ledger.path})"
        except FlameError as exc:
            return CheckItem("FAIL", "policy", str(config.policy), str(exc))
    target = str(config.policy) if config.policy is not None else "(none: FLAME_POLICY unset)"
    return CheckItem("ok", "policy", target, detail)


def _auth_checks(config: FlameConfig, broker: CheckItem, timeout: float) -> list[CheckItem]:
    """Identity and roster; plain-text password warning; live inbox isolation probe."""
    from flame.identity.checks import check_identity, check_isolation, check_plain_password

    items = check_identity(config)
    warning = check_plain_password(config)
    if warning is not None:
        items.append(warning)
    if broker.verdict == "ok":
        items.append(check_isolation(config, timeout))
    return items


def run_checks(*, timeout: float = 5.0) -> CheckReport:
    """Check everything this node's config uses; every item is tried, none stops the rest."""
    report = CheckReport()
    config = _check_config(report)
    if config is None:
        return report
    failed_tokens = _check_tokens(config, report)
    items: list[CheckItem] = []
    if config.broker.url is not None:
        try:
            broker_address(config.broker.url)
        except ConfigError as exc:
            items.append(CheckItem("FAIL", "broker", detail=str(exc)))
        else:
            items.append(_check_broker(config, failed_tokens, timeout))
            items.extend(_auth_checks(config, items[-1], timeout))
    if config.data_dir is not None:
        items.append(_check_data_dir(config.data_dir))
    for source in config.data:
        items.append(_check_source(source, failed_tokens, timeout))
    if config.storage.endpoint is not None or config.storage.results_dir is not None:
        items.append(_check_storage(config, failed_tokens, timeout))
    if config.secure.enabled:
        items.extend(_check_keys(config))
    items.append(_check_policy(config))
    secrets = config.secrets()
    for item in items:
        report.items.append(
            CheckItem(
                item.verdict,
                item.name,
                mask_credentials(item.target, secrets),
                mask_credentials(item.detail, secrets),
                item.fix,
            )
        )
    return report


def preflight(config: FlameConfig, *, timeout: float = 5.0) -> list[CheckItem]:
    """What `flame run` checks before joining, as `flame check` does: storage reachable and
    writable, the data folder readable. Returns the failed items (empty: go ahead)."""
    items: list[CheckItem] = []
    if config.role == "analysis" and config.data_dir is not None:
        items.append(_check_data_dir(config.data_dir))
    if config.storage.endpoint is not None or config.storage.results_dir is not None:
        items.append(_check_storage(config, set(), timeout))
    secrets = config.secrets()
    return [
        CheckItem(
            item.verdict,
            item.name,
            mask_credentials(item.target, secrets),
            mask_credentials(item.detail, secrets),
            item.fix,
        )
        for item in items
        if not item.ok
    ]

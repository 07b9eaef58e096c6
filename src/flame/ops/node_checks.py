"""The checks `flame check` runs on a node's own settings: config, tokens, broker (with
identity and inbox isolation), data, storage, secure-aggregation keys, policy.

Each `*_checks` function takes the `CheckRun` and returns its lines (none when its part is
not configured); `flame.ops.check.CHECKS` lists them in report order. They only read.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Set
from pathlib import Path
from urllib.parse import urlsplit

from flame.config import DataSourceSettings, FlameConfig, load_config, require_node_settings
from flame.errors import ConfigError, FlameError
from flame.ops.broker_probe import (
    BrokerUnavailable,
    broker_address,
    broker_username,
    connect_broker,
    public_url,
    stop_client,
    tcp_reachable,
)
from flame.ops.check_items import CheckItem, CheckReport, CheckRun

__all__ = [
    "broker_checks",
    "check_config",
    "check_data_dir",
    "check_storage",
    "check_tokens",
    "data_checks",
    "key_checks",
    "policy_checks",
    "storage_checks",
]


def _token_fix(service: str) -> str:
    if service == "broker":
        return "renew FLAME_BROKER__TOKEN (or the file FLAME_BROKER__TOKEN_FILE names)"
    if service == "storage":
        return "renew FLAME_STORAGE__TOKEN (or the file FLAME_STORAGE__TOKEN_FILE names)"
    return f"renew the token of {service} (its token / token_file in the data sources)"


def check_config(report: CheckReport) -> FlameConfig | None:
    """The config loads and names a node run; its lines go to `report`. None: stop here."""
    try:
        config = load_config()
    except ConfigError as exc:
        for line in str(exc).splitlines() or ["invalid configuration"]:
            report.items.append(CheckItem("FAIL", "config", detail=line))
        return None
    problems: list[str] = []
    try:
        require_node_settings(config)
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


def check_tokens(config: FlameConfig, report: CheckReport) -> set[str]:
    """Every configured token read and checked (lines to `report`); the services that failed."""
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


def _check_broker(config: FlameConfig, failed_tokens: Set[str], timeout: float) -> CheckItem:
    from flame.clients.token import TokenSource

    settings = config.broker
    assert settings.url is not None
    target = public_url(settings.url)
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
    stop_client(client)
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


def check_data_dir(path: Path) -> CheckItem:
    """The data folder exists and holds files (also `flame run`'s preflight)."""
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


def _check_source(source: DataSourceSettings, failed_tokens: Set[str], timeout: float) -> CheckItem:
    from flame.clients.token import TokenError, source_service_name

    name = f"data source {source.name!r}"
    fix = f"check the url of data source {source.name!r} (data list in FLAME_CONFIG / FLAME_DATA)"
    if source.kind == "local":
        return (
            check_data_dir(source.path)
            if source.path
            else CheckItem("FAIL", name, detail="kind local needs a path", fix=fix)
        )
    if not source.url:
        return CheckItem("FAIL", name, detail=f"kind {source.kind} needs a url", fix=fix)
    host, port, target = _host_port(source.url, default_secure=True)
    if source_service_name(source.name) in failed_tokens:
        return CheckItem("skip", name, public_url(target), "not tried: its token failed")
    unreachable = tcp_reachable(host, port, timeout)
    if unreachable:
        return CheckItem("FAIL", name, public_url(target), unreachable, fix)
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
        return CheckItem("FAIL", name, public_url(target), exc.reason, _token_fix(exc.service))
    except FlameError as exc:
        return CheckItem("FAIL", name, public_url(target), str(exc), fix)
    return CheckItem("ok", name, public_url(target))


def check_storage(config: FlameConfig, failed_tokens: Set[str], timeout: float) -> CheckItem:
    """The results folder is writable, or the bucket answers (also `flame run`'s preflight)."""
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
    target = f"{public_url(target)}/{settings.bucket}"
    if "storage" in failed_tokens:
        return CheckItem("skip", "storage", target, "not tried: its token failed")
    fix = "check FLAME_STORAGE__ENDPOINT"
    unreachable = tcp_reachable(host, port, timeout)
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


def _check_aggregator_policy(config: FlameConfig) -> CheckItem:
    """On the aggregation node FLAME_POLICY is the operator's central-DP budget, read as
    `flame run` reads it there (node rules such as min_count do not apply to it)."""
    from flame.privacy.central import CentralDP, load_aggregator_policy

    target = str(config.policy) if config.policy is not None else "(none: FLAME_POLICY unset)"
    try:
        central = CentralDP(
            load_aggregator_policy(config.policy),
            node_id=config.node_id or "aggregator",
            analysis_id=config.analysis_id,
        )
    except (ConfigError, FlameError) as exc:
        return CheckItem("FAIL", "policy", target, str(exc), "fix FLAME_POLICY's file")
    if central.ledger is None:
        return CheckItem(
            "ok", "policy", target, "aggregator: no central-DP budget (markers refused)"
        )
    left = central.ledger.remaining()
    detail = (
        f"aggregator central DP: epsilon_budget={central.policy.epsilon_budget:g} "
        f"budget_scope={central.policy.budget_scope}; left: epsilon {left.epsilon:g}, "
        f"delta {left.delta:g} (ledger {central.ledger.path})"
    )
    return CheckItem("ok", "policy", target, detail)


def _check_policy(config: FlameConfig) -> CheckItem:
    """The node policy in force, one line: the rules and what is left of the budget."""
    from flame.privacy.policy import load_policy
    from flame.privacy.release import Gate

    if config.role == "aggregation":
        return _check_aggregator_policy(config)
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
        if policy.release == "any":  # a DP budget, yet unmarked values leave unnoised
            detail += (
                '; WARNING: release = "any" lets unmarked values leave without noise; set '
                'release = "protected" so that only values this node noised leave'
            )
    target = str(config.policy) if config.policy is not None else "(none: FLAME_POLICY unset)"
    return CheckItem("ok", "policy", target, detail)


def _auth_checks(config: FlameConfig, broker: CheckItem, timeout: float) -> list[CheckItem]:
    """Identity and roster; plain-text password warning; live inbox isolation probe."""
    from flame.ops.auth_checks import check_identity, check_isolation, check_plain_password

    items = check_identity(config)
    warning = check_plain_password(config)
    if warning is not None:
        items.append(warning)
    if broker.verdict == "ok":
        items.append(check_isolation(config, timeout))
    return items


# ------------------------------------------------------------- the checks in `CHECKS`


def broker_checks(run: CheckRun) -> list[CheckItem]:
    """The broker (URL, token, a real MQTT session), then identity, roster and isolation."""
    config = run.config
    if config.broker.url is None:
        return []
    try:
        broker_address(config.broker.url)
    except ConfigError as exc:
        return [CheckItem("FAIL", "broker", detail=str(exc))]
    broker = _check_broker(config, run.failed_tokens, run.timeout)
    return [broker, *_auth_checks(config, broker, run.timeout)]


def data_checks(run: CheckRun) -> list[CheckItem]:
    """The data folder (FLAME_DATA_DIR) and every data source, each reached and probed."""
    config = run.config
    items: list[CheckItem] = []
    if config.data_dir is not None:
        items.append(check_data_dir(config.data_dir))
    for source in config.data:
        items.append(_check_source(source, run.failed_tokens, run.timeout))
    return items


def storage_checks(run: CheckRun) -> list[CheckItem]:
    """The results folder or the bucket, when the node stores anything."""
    storage = run.config.storage
    if storage.endpoint is None and storage.results_dir is None:
        return []
    return [check_storage(run.config, run.failed_tokens, run.timeout)]


def key_checks(run: CheckRun) -> list[CheckItem]:
    """The secure-aggregation key files, when secure aggregation is on (masking has none)."""
    if run.config.secure.enabled and run.config.secure.scheme == "masking":
        return [CheckItem("ok", "secure sums", "masking: fresh keys every sum, no key files")]
    return _check_keys(run.config) if run.config.secure.enabled else []


def policy_checks(run: CheckRun) -> list[CheckItem]:
    """The node policy in force and what is left of its privacy budget."""
    return [_check_policy(run.config)]

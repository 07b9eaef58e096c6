"""Container entry: read the config, pick the node's role, play it, return the result."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flame.aggregator.records import EventSink
from flame.aggregator.run_store import code_hash, open_node_state, open_run_store
from flame.aggregator.server import Aggregator
from flame.analysis.functions import AnalysisFunctions
from flame.config import FlameConfig, load_config, require_node_settings
from flame.data import Data, LocalSource
from flame.errors import ConfigError, FlameError
from flame.node.runtime import AnalysisClient
from flame.secure.fields import SecureKeys
from flame.transport.base import Transport
from flame.utils.signals import stop_on_sigterm

if TYPE_CHECKING:
    from flame.identity import Authenticator

__all__ = ["code_hash", "run"]

log = logging.getLogger(__name__)


def node_transport(
    config: FlameConfig, node_id: str, auth: Authenticator | None = None
) -> Transport:
    """The MQTT transport for this node (imported lazily: simulation does not need paho)."""
    from flame.transport.mqtt import MqttTransport

    claim_check = None
    if config.storage.claim_check:
        from flame.clients.minio_client import open_store
        from flame.transport.claim_check import StorageClaimCheck

        store = open_store(config.storage)
        if store is None:
            raise ConfigError(
                "FLAME_STORAGE__CLAIM_CHECK / storage.claim_check: needs "
                "FLAME_STORAGE__ENDPOINT (a store every node shares)"
            )
        claim_check = StorageClaimCheck(store, config.analysis_id, node_id)
    from flame.transport.generation import open_generation_store

    transport = MqttTransport(
        config.broker, config.analysis_id, node_id, claim_check=claim_check, auth=auth
    )
    transport.generation_store = open_generation_store(config, node_id)
    return transport


def node_data_handle(config: FlameConfig) -> Data:
    """This node's data sources from config, each probed once (a bad token stops here)."""
    from flame.data.sources import open_sources, probe_sources

    sources: dict[str, object] = {}
    if config.data_dir is not None:
        sources["local"] = LocalSource(config.data_dir)
    sources.update(open_sources(config.data))
    if not sources:
        raise ConfigError(
            "FLAME_DATA_DIR / data_dir or FLAME_DATA / data: an analysis node needs data"
        )
    probe_sources(sources)
    return Data(sources, node_id=config.node_id or "")


def check_code_approval(config: FlameConfig, role: str, code: str) -> None:
    """Refuse analysis code the operator has not approved (FLAME_APPROVED_CODE), naming its
    hash, so the operator can review it and add it. Without a list, any code runs (warned)."""
    if not config.approved_code:
        if role == "analysis":
            log.warning(
                "no FLAME_APPROVED_CODE: this node runs any analysis code it is given "
                "(this one: SHA-256 %s)",
                code,
            )
        return
    if code not in config.approved_code:
        raise ConfigError(
            f"FLAME_APPROVED_CODE / approved_code: this analysis code (SHA-256 {code}) is not "
            f"approved on node {config.node_id!r}; review it, then add its hash "
            "(`flame hash ANALYSIS` prints it)"
        )
    log.info("analysis code %s is approved on this node", code[:16])


def secure_keys(config: FlameConfig, role: str) -> SecureKeys | None:
    """This node's secure-aggregation keys, or None when secure aggregation is off."""
    if not config.secure.enabled:
        return None
    from flame.identity import check_private_file

    # A private key or key share others may read is refused, as ssh refuses such a key.
    if config.secure.private_key_file is not None:
        check_private_file(
            Path(config.secure.private_key_file),
            "FLAME_SECURE__PRIVATE_KEY_FILE / secure.private_key_file",
        )
    if config.secure.key_share_file is not None:
        check_private_file(
            Path(config.secure.key_share_file),
            "FLAME_SECURE__KEY_SHARE_FILE / secure.key_share_file",
        )
    return SecureKeys.from_settings(config.secure, role=role, node_id=config.node_id)


def run(
    analyze: Callable[..., Any] | None = None,
    aggregate: Callable[..., Any] | None = None,
    converged: Callable[..., Any] | None = None,
    *,
    config: FlameConfig | None = None,
    on_event: EventSink | None = None,
    code: str | None = None,
) -> Any:
    """Play this node's role (from FLAME_ROLE) in a real federated run; return the final value.

    Both functions are passed on every node, so one image serves both roles. `code` is the
    analysis's SHA-256 (`flame run` passes that of its files, as `flame hash` prints it);
    by default that of the files defining the functions.
    """
    from flame.isolation.child import refuse_nested_run

    refuse_nested_run("flame.run")
    config = config if config is not None else load_config()
    with stop_on_sigterm():
        return _run(analyze, aggregate, converged, config, on_event, code)


def _run(
    analyze: Callable[..., Any] | None,
    aggregate: Callable[..., Any] | None,
    converged: Callable[..., Any] | None,
    config: FlameConfig,
    on_event: EventSink | None,
    code: str | None = None,
) -> Any:
    node_id, role = require_node_settings(config)
    functions = AnalysisFunctions.of(analyze, aggregate, converged)
    code = code if code is not None else code_hash(functions)
    from flame.clients.token import check_service_tokens

    check_service_tokens(config)  # a bad token stops the node before any work
    check_code_approval(config, role, code)  # before any data or the broker is touched
    from flame.ops.check import preflight

    failed = preflight(config)  # `flame check`'s storage and data checks, before joining
    if failed:
        raise FlameError(
            "not joining the run: "
            + "; ".join(item.line().removeprefix("FAIL ") for item in failed)
        )
    secrets = config.secrets()
    masking = None
    if config.secure.enabled and config.secure.scheme == "masking":  # no keys: fresh per sum
        from flame.secure.masking import MaskingSettings

        masking = MaskingSettings.from_settings(config.secure)
    keys = secure_keys(config, role) if masking is None else None
    if keys is not None and keys.private_key is not None:
        log.warning(
            "single-key secure aggregation: this node holds the one private key, so any one "
            "key holder can decrypt every node's secure values it sees; threshold keys "
            "(`flame keys generate --threshold`) are the production mode"
        )
    from flame.identity import for_config

    auth = for_config(config, node_id)
    if masking is not None and auth is None:
        log.warning(
            "masked secure sums without a roster: nothing is signed, so an aggregator that "
            "substitutes a node's keys can read that node's values"
        )
    if auth is not None:
        log.info("roster %s: %d members", auth.roster.fingerprint, len(auth.roster))
        if keys is not None:  # contributions signed by this node, checked against the roster
            keys.signer = auth.identity.sign
            keys.verifier = auth.roster.verifier("analysis")
    transport = node_transport(config, node_id, auth)
    if role == "aggregation":
        from flame.privacy.central import CentralDP, load_aggregator_policy

        central = CentralDP(  # the aggregator operator's budget for noise on the aggregate
            load_aggregator_policy(config.policy), node_id=node_id, analysis_id=config.analysis_id
        )
        aggregator = Aggregator(
            transport,
            functions,
            participants=config.participants,
            epochs=config.epochs,
            quorum=config.quorum,
            epoch_timeout=config.epoch_timeout,
            presence_timeout=config.presence_timeout,
            store=open_run_store(config, functions, node_id, code=code, auth=auth),
            on_event=on_event,
            seed=config.seed,
            secrets=secrets,
            keys=keys,
            code=code,
            masking=masking,
            central=central,
        )
        aggregator.context.params = dict(config.params)
        return aggregator.execute().value
    from flame.isolation.runner import settings_paths
    from flame.privacy.policy import load_policy

    policy = load_policy(config.policy)  # the operator's file; never from the aggregator
    data = node_data_handle(config)
    client = AnalysisClient(
        transport,
        aggregator_id=config.aggregator_id,
        participants=config.participants,
        wait_timeout=config.presence_timeout + 2 * config.epoch_timeout,
        seed=config.seed,
        state=open_node_state(config, node_id),
        secrets=secrets,
        keys=keys,
        resend_interval=config.resend_interval,
        isolate=policy.isolate,
        policy=policy,
        code=code,
        hide=settings_paths(config, policy),
        masking=masking,
    )
    client.context.params = dict(config.params)
    return client.run(functions, data).value

"""Container entry: read the config, pick the node's role, play it, return the result."""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flame._signals import stop_on_sigterm
from flame.config import FlameConfig, load_config
from flame.data import Data, LocalSource
from flame.errors import ConfigError
from flame.federated.aggregator_server import Aggregator
from flame.federated.analysis_client import AnalysisClient
from flame.federated.functions import AnalysisFunctions
from flame.federated.records import EventSink, RunStore
from flame.federated.secure import SecureKeys
from flame.transport.base import Transport

__all__ = ["run"]

log = logging.getLogger(__name__)


def _require(config: FlameConfig) -> tuple[str, str]:
    problems = []
    if config.node_id is None:
        problems.append("FLAME_NODE_ID / node_id: required for a node run (this node's id)")
    if config.role is None:
        problems.append("FLAME_ROLE / role: required for a node run ('analysis' or 'aggregation')")
    if not config.participants:
        problems.append("FLAME_PARTICIPANTS / participants: required (the analysis nodes' ids)")
    if config.broker.url is None:
        problems.append(
            "FLAME_BROKER__URL / broker.url: required for a node run (mqtt://host:1883)"
        )
    if config.role == "analysis" and config.node_id not in config.participants:
        problems.append(
            f"FLAME_NODE_ID / node_id: {config.node_id!r} is not one of the participants"
        )
    if problems:
        raise ConfigError("\n".join(problems))
    assert config.node_id is not None and config.role is not None
    return config.node_id, config.role


def node_transport(config: FlameConfig, node_id: str) -> Transport:
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
    return MqttTransport(config.broker, config.analysis_id, node_id, claim_check=claim_check)


def node_data_handle(config: FlameConfig) -> Data:
    """This node's data sources from config, each probed once (a bad token stops here)."""
    from flame.clients.data_api_client import open_sources, probe_sources

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


def code_hash(functions: AnalysisFunctions) -> str:
    """SHA-256 over the source files that define the analyst's functions (provenance)."""
    files: set[str] = set()
    for function in (functions.analyze, functions.aggregate, functions.converged):
        if function is None:
            continue
        original: Callable[..., Any] = getattr(function, "__wrapped__", function)
        try:
            source = inspect.getsourcefile(original)
        except TypeError:
            source = None
        if source:
            files.add(source)
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(Path(name).name.encode() + b"\0" + Path(name).read_bytes() + b"\0")
    return digest.hexdigest()


def aggregator_store(
    config: FlameConfig, functions: AnalysisFunctions, aggregator_id: str
) -> RunStore | None:
    """Checkpoints and final results on the configured storage (None: keep nothing)."""
    from flame.clients.minio_client import open_store
    from flame.federated.run_store import StorageRunStore

    store = open_store(config.storage)
    if store is None:
        return None
    provenance = {
        "code_sha256": code_hash(functions),
        "participants": list(config.participants),
        "config": config.public_dict(),
    }
    return StorageRunStore(store, config.analysis_id, aggregator_id, provenance=provenance)


def node_state(config: FlameConfig, node_id: str) -> Any:
    """Where `context().save/load` keep this node's values."""
    from flame.clients.minio_client import open_store
    from flame.federated.run_store import MemoryState, NodeState

    store = open_store(config.storage)
    return MemoryState() if store is None else NodeState(store, config.analysis_id, node_id)


def secure_keys(config: FlameConfig, role: str) -> SecureKeys | None:
    """This node's secure-aggregation keys, or None when secure aggregation is off."""
    if not config.secure.enabled:
        return None
    return SecureKeys.from_settings(config.secure, role=role)


def run(
    analyze: Callable[..., Any] | None = None,
    aggregate: Callable[..., Any] | None = None,
    converged: Callable[..., Any] | None = None,
    *,
    config: FlameConfig | None = None,
    on_event: EventSink | None = None,
) -> Any:
    """Play this node's role (from FLAME_ROLE) in a real federated run; return the final value.

    Both functions are passed on every node, so one image serves both roles.
    """
    config = config if config is not None else load_config()
    with stop_on_sigterm():
        return _run(analyze, aggregate, converged, config, on_event)


def _run(
    analyze: Callable[..., Any] | None,
    aggregate: Callable[..., Any] | None,
    converged: Callable[..., Any] | None,
    config: FlameConfig,
    on_event: EventSink | None,
) -> Any:
    node_id, role = _require(config)
    functions = AnalysisFunctions.of(analyze, aggregate, converged)
    from flame.utils.token import check_service_tokens

    check_service_tokens(config)  # a bad token stops the node before any work
    secrets = config.secrets()
    keys = secure_keys(config, role)
    transport = node_transport(config, node_id)
    if role == "aggregation":
        aggregator = Aggregator(
            transport,
            functions,
            participants=config.participants,
            epochs=config.epochs,
            quorum=config.quorum,
            epoch_timeout=config.epoch_timeout,
            presence_timeout=config.presence_timeout,
            store=aggregator_store(config, functions, node_id),
            on_event=on_event,
            seed=config.seed,
            secrets=secrets,
            keys=keys,
        )
        return aggregator.execute().value
    data = node_data_handle(config)
    client = AnalysisClient(
        transport,
        aggregator_id=config.aggregator_id,
        participants=config.participants,
        wait_timeout=config.presence_timeout + 2 * config.epoch_timeout,
        seed=config.seed,
        state=node_state(config, node_id),
        secrets=secrets,
        keys=keys,
        resend_interval=config.resend_interval,
    )
    return client.run(functions, data).value

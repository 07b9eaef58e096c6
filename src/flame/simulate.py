"""A whole federation on one machine: the aggregator and one thread per analysis node.

The nodes talk through a transport exactly as in production (the in-process memory broker by
default, a real MQTT broker when one is given), so what runs here runs on the nodes.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flame.aggregator.records import EpochRecord, Event, EventSink, RunResult, RunStore
from flame.aggregator.run_store import code_hash, open_node_state, open_run_store
from flame.aggregator.server import Aggregator
from flame.analysis.functions import AnalysisFunctions
from flame.config import FlameConfig, load_config
from flame.data import Data, LocalSource, MemorySource
from flame.errors import ConfigError, DataError, FlameError, RunFailed, RunTimeout
from flame.isolation.child import refuse_nested_run
from flame.node.runtime import AnalysisClient
from flame.ops.run_output import failure_document, run_document, write_document
from flame.privacy.central import AggregatorPolicy, CentralDP, load_aggregator_policy
from flame.privacy.policy import NodePolicy, load_policy
from flame.secure.fields import SecureKeys
from flame.secure.simulation_keys import SecureMode, parse_secure, simulation_keys
from flame.transport.base import Transport
from flame.transport.memory import MemoryBroker, MemoryTransport
from flame.utils import logs as _logging

if TYPE_CHECKING:
    from flame.identity import Authenticator

__all__ = ["DataSpec", "node_data", "simulate"]

log = logging.getLogger(__name__)

DataSpec = str | Path | Mapping[str, "str | Path | Mapping[str, bytes | str] | Data"]
_NODE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
TransportFactory = Callable[[str], Transport]


def node_data(spec: DataSpec) -> dict[str, Data]:
    """One `Data` handle per node: from a folder of node folders, or a mapping node -> data."""
    if isinstance(spec, (str, Path)):
        root = Path(spec)
        if not root.is_dir():
            raise DataError(f"data folder {root} does not exist")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DataError(f"data folder {root} has no node folders (one sub-folder per node)")
        spec = {folder.name: folder for folder in folders}
    nodes: dict[str, Data] = {}
    for node, item in spec.items():
        if not _NODE_ID.match(node):
            raise DataError(
                f"node name {node!r} may use only letters, digits, '.', '_' and '-' "
                "(it is the node id)"
            )
        if isinstance(item, Data):
            handle = item
        elif isinstance(item, (str, Path)):
            handle = Data({"local": LocalSource(item)}, node_id=node)
        else:
            handle = Data({"memory": MemorySource(item)}, node_id=node)
        if not handle.sources:
            raise DataError(f"node {node!r} has no data source")
        if handle.has_files() and not handle.files():
            where = f" ({item})" if isinstance(item, (str, Path)) else ""
            raise DataError(f"node {node!r} has no data files{where}")
        nodes[node] = handle
    if not nodes:
        raise DataError("no nodes to simulate")
    return nodes


PolicySpec = NodePolicy | str | Path


def node_policies(
    spec: PolicySpec | Mapping[str, PolicySpec] | None, nodes: list[str]
) -> dict[str, NodePolicy]:
    """Each simulated node's policy (files are read once; unknown node ids are an error)."""
    if not isinstance(spec, Mapping):
        one = spec if isinstance(spec, NodePolicy) else load_policy(spec)
        return {node: one for node in nodes}
    unknown = sorted(set(spec) - set(nodes))
    if unknown:
        raise FlameError(f"policy given for unknown node(s): {', '.join(unknown)}")
    policies: dict[str, NodePolicy] = {}
    for node in nodes:
        item = spec.get(node)  # a node not named: the mapping's default (or no policy)
        policies[node] = item if isinstance(item, NodePolicy) else load_policy(item)
    return policies


def simulate(
    analyze: Callable[..., Any],
    aggregate: Callable[..., Any],
    converged: Callable[..., Any] | None = None,
    *,
    data: DataSpec | None = None,
    nodes: str | Path | None = None,
    params: Mapping[str, Any] | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    config: FlameConfig | None = None,
    broker: MemoryBroker | TransportFactory | None = None,
    on_event: EventSink | None = None,
    store: RunStore | None = None,
    secure: bool | str = False,
    isolate: bool = False,
    policy: PolicySpec | Mapping[str, PolicySpec] | None = None,
    output: str | Path | None = None,
    aggregator_policy: AggregatorPolicy | str | Path | None = None,
) -> RunResult:
    """Run `analyze` on every node's data and `aggregate` once per epoch; return the result.

    `data` is a folder with one sub-folder per node (the folder name is the node id) or a
    mapping of node id to a folder, a `{file name: content}` mapping, or a `Data` handle;
    or instead `nodes`, a nodes file (TOML: each node's own sources, as `flame simulate
    --nodes`). `params` are the run parameters of `flame.context().params` (over
    FLAME_PARAMS, as `--param`). FLAME_* variables apply (epochs, timeouts, quorum, seed);
    arguments given here win.
    `secure=True` (or FLAME_SECURE__ENABLED) sums `flame.secure(...)` values under
    Paillier encryption, with the configured key files or a throwaway key pair;
    `secure="threshold"` or `"threshold:T"` deals throwaway threshold shares, one per node,
    any T of which decrypt (default T: a majority).
    `output` writes the run as JSON (`flame report` renders it), also when the run fails.
    `policy` is the node policy (a `NodePolicy` or a policy file) for every node, or a
    mapping node id -> policy; default: FLAME_POLICY's file, if set.
    `aggregator_policy` (an `AggregatorPolicy` or a policy file) is the aggregator's budget
    for central DP: noise on `flame.dp` markers `aggregate` returns (none: they are refused).
    `isolate=True` runs each node's `analyze` in a child process as on a production node
    (the `flame simulate` command does); `analyze` must then live in a module or file.
    The children are forked per epoch from one confined server, FLAME_SIMULATE_WORKERS
    (default: one per core) computing at a time; module globals do not carry over between
    epochs (keep state with `flame.context().save/load`). FLAME_SIMULATE_WORKERS=0: one
    spawned child per node for the whole run, as `flame run` does.
    Raises `RunFailed` with the failing node and its error if any node fails.
    """
    refuse_nested_run("flame.simulate")
    functions = AnalysisFunctions.of(analyze, aggregate, converged)
    if isolate:  # before any node starts: each would fail alike, later and less clearly
        from flame.isolation.runner import not_isolable

        problem = not_isolable(functions.analyze)
        if problem:
            raise FlameError(problem)
    mode = parse_secure(secure)
    if (data is None) == (nodes is None):
        raise FlameError("give flame.simulate either data= or nodes= (a nodes file), not both")
    if nodes is not None:
        from flame.ops.nodes_file import load_nodes

        handles = load_nodes(Path(nodes))
    else:
        assert data is not None
        handles = node_data(data)
    if config is None:
        config = load_config(epochs=epochs, seed=seed)
    else:
        changes = {k: v for k, v in {"epochs": epochs, "seed": seed}.items() if v is not None}
        config = config.model_copy(update=changes) if changes else config
    if params:
        if not all(isinstance(key, str) and key for key in params):
            raise FlameError("params: keys must be non-empty strings")
        config = config.model_copy(update={"params": {**config.params, **params}})
    out = None if output is None else Path(output)
    if out is not None and not out.parent.is_dir():
        raise FlameError(f"output {out}: folder {out.parent} does not exist")
    participants = sorted(handles)
    if config.aggregator_id in handles:
        raise DataError(f"a node may not be named {config.aggregator_id!r} (the aggregator's id)")
    if config.quorum is not None and config.quorum > len(participants):
        raise FlameError(
            f"FLAME_QUORUM is {config.quorum}, but only {len(participants)} nodes have data"
        )
    from flame.identity import throwaway

    auths = throwaway(config.aggregator_id, participants)
    try:
        code: str | None = code_hash(functions)  # every node announces it; the aggregator
    except OSError:  # compares. Functions typed into a notebook cell have no source file.
        code = None
    connect = _signed(_transport_factory(broker, config), auths)
    if mode is None and config.secure.enabled:
        mode = SecureMode()
    masking = None
    if mode is not None and config.secure.scheme == "masking":  # no keys: fresh every sum
        if mode.threshold:
            raise ConfigError(
                "secure='threshold' and FLAME_SECURE__SCHEME=masking exclude each other: "
                "masking needs no keys (its threshold is FLAME_SECURE__MASKING_THRESHOLD)"
            )
        from flame.secure.masking import MaskingSettings

        masking = MaskingSettings.from_settings(config.secure)
    paillier = mode is not None and masking is None
    keys = simulation_keys(config, mode, participants) if paillier and mode else None
    if keys is not None:  # contributions signed, checked against the throwaway roster
        keys.verifier = auths[config.aggregator_id].roster.verifier("analysis")
    secrets = config.secrets()
    policies = node_policies(policy if policy is not None else config.policy, participants)
    central = CentralDP(
        load_aggregator_policy(aggregator_policy),
        node_id=config.aggregator_id,
        analysis_id=config.analysis_id,
        where="flame simulate --aggregator-policy FILE, flame.simulate(aggregator_policy=...)",
    )
    pooled = False
    if not isolate:  # one thread per node in this process: see flame.utils.malloc
        from flame.utils.malloc import cap_malloc_arenas

        cap_malloc_arenas()
    if isolate:  # children forked per epoch from one server, a few at a time
        from flame.isolation.forkserver import slots, supported

        pooled = supported() and slots() > 0
    failures: dict[str, BaseException] = {}
    history: list[EpochRecord] = []  # finished epochs, for `output` when the run fails

    def run_node(node: str) -> None:
        _logging.set_node(node)
        client = AnalysisClient(
            connect(node),
            aggregator_id=config.aggregator_id,
            participants=participants,
            wait_timeout=config.presence_timeout + 2 * config.epoch_timeout,
            seed=config.seed,
            state=open_node_state(config, node, simulated=True),
            secrets=secrets,
            keys=None if keys is None else _node_keys(keys, auths[node]),
            code=code,
            log_traceback=False,  # the aggregator's log, in this same process, shows it
            resend_interval=config.resend_interval,
            isolate=isolate,
            pooled=pooled,
            policy=policies[node],
            masking=masking,
        )
        client.context.params = dict(config.params)
        client.quoted_data_leaves = True  # nothing leaves this process: the analyst sees it all
        try:
            client.run(functions, handles[node])
        except BaseException as exc:  # recorded; the aggregator reports the run's outcome
            failures[node] = exc
            log.debug("node %s stopped: %s", node, exc)

    threads = [
        threading.Thread(target=run_node, args=(node,), name=f"flame-{node}", daemon=True)
        for node in participants
    ]
    aggregator = Aggregator(
        connect(config.aggregator_id),
        functions,
        participants=participants,
        epochs=config.epochs,
        quorum=config.quorum,
        epoch_timeout=config.epoch_timeout,
        presence_timeout=config.presence_timeout,
        store=store
        if store is not None
        else open_run_store(config, functions, config.aggregator_id),
        on_event=_recording(history, on_event),
        seed=config.seed,
        secrets=secrets,
        keys=None if keys is None else keys.public_only(),
        code=code,
        masking=masking,
        central=central,
    )
    aggregator.context.params = dict(config.params)
    for thread in threads:
        thread.start()
    try:
        result = aggregator.execute()
    except (RunFailed, RunTimeout) as failed:
        if out is not None:
            write_document(
                out,
                failure_document(
                    failed,
                    config.analysis_id,
                    history,
                    functions,
                    participants,
                    aggregator.epoch_so_far(),
                ),
            )
        hint = _budget_hint(failed, policies) if isinstance(failed, RunFailed) else ""
        if not hint or not isinstance(failed, RunFailed):
            raise
        raise RunFailed(
            f"{failed.reason}; {hint}",
            node=failed.node,
            epoch=failed.epoch,
            traceback=failed.traceback,
        ) from failed
    finally:
        for thread in threads:
            thread.join(timeout=10.0)
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        log.warning("nodes still running after the run ended: %s", ", ".join(stuck))
    for node, exc in failures.items():
        if not isinstance(exc, RunFailed):
            raise RunFailed(f"node {node!r} failed: {exc}", node=node) from exc
    if out is not None:
        write_document(out, run_document(result, functions, participants))
    return result


def _recording(history: list[EpochRecord], then: EventSink | None) -> EventSink:
    """Keep each finished epoch's record, and pass every event on."""

    def sink(event: Event) -> None:
        if event.kind == "epoch_finished" and event.record is not None:
            history.append(event.record)
        if then is not None:
            then(event)

    return sink


def _budget_hint(exc: RunFailed, policies: Mapping[str, NodePolicy]) -> str:
    """How to start a simulated budget afresh, when a node refused for lack of budget."""
    policy = policies.get(exc.node or "")
    if policy is None or policy.ledger_dir is None:
        return ""
    if not any(f"(rule: {rule})" in exc.reason for rule in ("epsilon_budget", "delta_budget")):
        return ""
    return (
        f"the simulated nodes' spends are kept in {policy.ledger_dir} (the policy's "
        "ledger_dir): delete that folder to reset the budget"
    )


def _node_keys(keys: SecureKeys, auth: Authenticator) -> SecureKeys:
    """This node's keys, signing its contributions with its (throwaway) identity."""
    return replace(keys.for_node(auth.node_id), signer=auth.identity.sign)


def _signed(connect: TransportFactory, auths: dict[str, Authenticator]) -> TransportFactory:
    """Transports signing with throwaway identities: the production path, every time."""

    def make(node: str) -> Transport:
        transport = connect(node)
        if transport.auth is None:
            transport.use_auth(auths[node])
        return transport

    return make


def _transport_factory(
    broker: MemoryBroker | TransportFactory | None, config: FlameConfig
) -> TransportFactory:
    if broker is None or isinstance(broker, MemoryBroker):
        shared = (
            broker
            if broker is not None
            else MemoryBroker(max_message_bytes=config.broker.max_message_bytes)
        )
        return lambda node: MemoryTransport(shared, config.analysis_id, node)
    return broker

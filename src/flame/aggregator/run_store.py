"""Checkpoints, final results, provenance and node-local state on an object store.

The aggregator checkpoints after every epoch, so a restarted aggregator resumes after the
last completed epoch instead of starting over; the final result is written with a manifest
that says what produced it. Values are stored in flame's wire format (no pickle).

A storage blip (a restarting MinIO, a network hiccup) must not end a federation: checkpoint
and result writes are retried with backoff for up to `retry_s` seconds while the values stay
in memory; only then the run fails, naming the object and the cause.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from flame.aggregator.records import Checkpoint, EpochRecord, RunResult, RunStore
from flame.aggregator.signed_store import sign_record
from flame.aggregator.stored_reads import RunReads
from flame.clients.object_store import AnalysisLayout, ObjectNotFound, ObjectStore, StorageError
from flame.errors import ConfigError, FlameError
from flame.wire.envelope import pack, to_jsonable, unpack

if TYPE_CHECKING:
    from flame.analysis.functions import AnalysisFunctions
    from flame.config import FlameConfig
    from flame.identity import Authenticator
    from flame.identity.roster import Roster

__all__ = [
    "MemoryState",
    "forwarded_logs_key",
    "NodeState",
    "StorageRunStore",
    "code_hash",
    "load_result",
    "open_node_state",
    "open_run_store",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_RUN_FIELDS = ("participants", "params", "roster_sha256")
"""Provenance a stored record must share with this run (beside the code) to be taken as its
own: a signed final or checkpoint of a run with other participants, parameters or roster
is not this run's, however genuine its signature."""


def _record(data: dict[str, Any]) -> EpochRecord:
    return EpochRecord.from_dict(data)


def forwarded_logs_key(analysis_id: str) -> str:
    """Where the aggregator keeps the nodes' forwarded log lines of a run."""
    return f"{AnalysisLayout(analysis_id).root}logs/forwarded.json"


class StorageRunStore:
    """The aggregator's `RunStore` on MinIO/S3 or a local folder.

    With `auth` (a roster run) every record the aggregator acts on again is signed with its
    identity and verified before use (`flame.aggregator.signed_store`). `shared`: the claim
    check gives every node this store's credentials, so nothing only the operator may read
    (forwarded log lines, failure details) is written to it."""

    def __init__(
        self,
        store: ObjectStore,
        analysis_id: str,
        aggregator_id: str,
        *,
        provenance: dict[str, Any] | None = None,
        retry_s: float = 120.0,
        auth: Authenticator | None = None,
        shared: bool = False,
    ) -> None:
        self.store = store
        self.retry_s = retry_s
        self.layout = AnalysisLayout(analysis_id)
        self.aggregator_id = aggregator_id
        self.provenance = dict(provenance or {})
        self.auth = auth
        self.shared = shared
        # Which run the records are of: new per run, taken over from the checkpoint a resumed
        # run continues; signed into each record so a final of an earlier run is told apart.
        self.run = uuid.uuid4().hex[:16]
        store.ensure_bucket()

    def _sign(self, key: str, record: dict[str, Any]) -> dict[str, Any]:
        if self.auth is None:
            return record
        return sign_record(self.auth.identity, self.layout.analysis_id, key, record)

    def _reads(self) -> RunReads:
        """The records as every other reader checks them (`flame.aggregator.stored_reads`)."""
        roster = self.auth.roster if self.auth is not None else None
        return RunReads(self.store, self.layout, roster=roster, aggregator_id=self.aggregator_id)

    def _same_code(self, stored: dict[str, Any], what: str) -> None:
        """Refuse to mix runs of different analysis code under one analysis id (a record
        without a code hash is refused too: it cannot show it is of this code), or of other
        participants, parameters or roster (named by field, never by value)."""
        mine, theirs = self.provenance.get("code_sha256"), stored.get("code_sha256")
        if mine and mine != theirs:
            raise ConfigError(
                f"FLAME_ANALYSIS_ID / analysis_id: {self.layout.analysis_id!r} has a {what} "
                f"from {'different' if theirs else 'unnamed'} analysis code; use a new "
                f"analysis id (or remove {self.layout.root} from storage) to start over"
            )
        for field in _RUN_FIELDS:
            if field in self.provenance and _comparable(field, stored.get(field)) != (
                _comparable(field, self.provenance[field])
            ):
                raise ConfigError(
                    f"FLAME_ANALYSIS_ID / analysis_id: {self.layout.analysis_id!r} has a "
                    f"{what} of a run with other {field}; use a new analysis id (or remove "
                    f"{self.layout.root} from storage) to start over"
                )

    def _run_provenance(self) -> dict[str, Any]:
        """What a checkpoint records of its run, so a resume can check it is the same run."""
        fields = {name: self.provenance[name] for name in _RUN_FIELDS if name in self.provenance}
        return {"code_sha256": self.provenance.get("code_sha256"), **fields, "run": self.run}

    def load_final(self) -> RunResult | None:
        """The stored result of a run that already finished under this analysis id: only the
        end of the run its checkpoints are of (not an earlier run's final put back)."""
        reads = self._reads()
        try:
            manifest, _ = reads.manifest()
        except ObjectNotFound:
            return None
        self._same_code(manifest, "finished run")
        value = reads.final_value(manifest)
        return RunResult(
            self.layout.analysis_id,
            value,
            bool(manifest["converged"]),
            int(manifest["epochs"]),
            [_record(item) for item in manifest["history"]],
            manifest["result"]["key"],
        )

    def load_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint, if every listed one is verified and of one run."""
        reads = self._reads()
        newest = reads.newest()
        if newest.record is None:
            return None
        meta = newest.record
        self._same_code(meta, "checkpoint")
        value = reads.epoch_value(newest.epoch, meta)
        if isinstance(meta.get("run"), str):
            self.run = meta["run"]  # the resumed run goes on: its final is of the same run
        history = [_record(item) for item in meta["history"]]
        nodes_run = meta.get("nodes_run")  # the nodes' run id (signed with the record)
        run = nodes_run if isinstance(nodes_run, str) else None
        return Checkpoint(int(meta["next_epoch"]), value, history, run)

    def _persist(self, key: str, write: Callable[[], _T]) -> _T:
        """`write()`, retried with backoff for up to `retry_s` s; StorageError naming `key`
        and the last cause after that."""
        started = time.monotonic()
        delay = 0.5
        while True:
            try:
                return write()
            except (StorageError, OSError) as exc:
                left = self.retry_s - (time.monotonic() - started)
                if left <= 0:
                    raise StorageError(
                        f"storage: could not write {key} within FLAME_STORAGE__RETRY_S = "
                        f"{self.retry_s:g} s: {exc}"
                    ) from None
                log.warning(
                    "storage: writing %s failed (%s); retrying for %.0f s more", key, exc, left
                )
                time.sleep(min(delay, left))
                delay = min(delay * 2, 10.0)

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        epoch = checkpoint.next_epoch - 1
        key = self.layout.epoch_result(epoch, self.aggregator_id)
        data = pack(checkpoint.previous)
        stored = self._persist(key, lambda: self.store.put_bytes(key, data))
        meta_key = self.layout.checkpoint(epoch)
        meta = self._sign(
            meta_key,
            {
                "next_epoch": checkpoint.next_epoch,
                "aggregate_sha256": stored.sha256,
                "aggregate_size": stored.size,
                "history": [record.to_dict() for record in checkpoint.history],
                "saved": time.time(),
                "nodes_run": checkpoint.run,
                **self._run_provenance(),
            },
        )
        self._persist(meta_key, lambda: self.store.put_json(meta_key, meta))

    def save_final(self, result: RunResult) -> str:
        from flame import __version__

        data = pack(result.value)
        key = self.layout.final_result()
        stored = self._persist(key, lambda: self.store.put_bytes(key, data))
        manifest = {
            "analysis_id": result.analysis_id,
            "flame_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "epochs": result.epochs,
            "converged": result.converged,
            "history": [record.to_dict() for record in result.history],
            "result": {"key": stored.key, "sha256": stored.sha256, "size": stored.size},
            **self.provenance,
            "run": self.run,
        }
        manifest = self._sign(self.layout.manifest(), manifest)
        self._persist(
            self.layout.manifest(), lambda: self.store.put_json(self.layout.manifest(), manifest)
        )
        return stored.uri or stored.key

    def save_failure(self, record: dict[str, Any]) -> str | None:
        """Keep why the run failed (reason, node, epoch, the analysis traceback when sent)
        under `{analysis}/failures/`; one attempt: a failing run must not wait on storage.
        Not in a store shared with the nodes (claim check): then only the aggregator's log."""
        if self.shared:
            return None
        key = f"{self.layout.root}failures/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
        body = {**record, "code_sha256": self.provenance.get("code_sha256"), "run": self.run}
        self.store.put_json(key, self._sign(key, body))  # signed: `flame status` shows it
        return key

    def save_logs(self, lines: list[str]) -> None:
        """The nodes' latest forwarded log lines, kept with the run (`flame status --logs`):
        readable with the storage credentials, never from the broker. One attempt. Not in a
        store every node can read (claim check): then only in the aggregator's own log."""
        if self.shared:
            return
        key = forwarded_logs_key(self.layout.analysis_id)
        self.store.put_json(key, {"lines": lines, "saved": time.time()})


class NodeState:
    """The analyst's `context().save/load` on this node's own storage."""

    def __init__(self, store: ObjectStore, analysis_id: str, node_id: str) -> None:
        self.store = store
        self.layout = AnalysisLayout(analysis_id)
        self.node_id = node_id
        store.ensure_bucket()

    def save(self, tag: str, value: Any) -> None:
        self.store.put_bytes(self.layout.node_state(self.node_id, tag), pack(value))

    def load(self, tag: str, default: Any = None) -> Any:
        try:
            return unpack(self.store.get_bytes(self.layout.node_state(self.node_id, tag)))
        except ObjectNotFound:
            return default

    def reserved(self) -> RuntimeState:
        """The runtime's own state of this node, out of reach of `context().save/load`."""
        return RuntimeState(self.store, self.layout, self.node_id)


class RuntimeState:
    """The runtime's own node state (the threshold guard ledger), beside the analyst's."""

    def __init__(self, store: ObjectStore, layout: AnalysisLayout, node_id: str) -> None:
        self.store = store
        self.layout = layout
        self.node_id = node_id

    def save(self, tag: str, value: Any) -> None:
        self.store.put_bytes(self.layout.node_runtime_state(self.node_id, tag), pack(value))

    def load(self, tag: str, default: Any = None) -> Any:
        try:
            key = self.layout.node_runtime_state(self.node_id, tag)
            return unpack(self.store.get_bytes(key))
        except ObjectNotFound:
            return default


class MemoryState:
    """Node-local state kept in memory, when no storage is configured (simulation)."""

    def __init__(self, *, whole_run_here: bool = False) -> None:
        self._values: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._reserved: MemoryState | None = None
        # False in a simulation: the run, its throwaway keys and this state end together, so
        # there is no restart that could forget what this state remembers.
        self.forgotten_on_restart = not whole_run_here

    def reserved(self) -> MemoryState:
        """The runtime's own state, apart from the analyst's tags."""
        with self._lock:
            if self._reserved is None:
                self._reserved = MemoryState(whole_run_here=not self.forgotten_on_restart)
            return self._reserved

    def save(self, tag: str, value: Any) -> None:
        with self._lock:
            self._values[tag] = pack(value)

    def load(self, tag: str, default: Any = None) -> Any:
        with self._lock:
            data = self._values.get(tag)
        return default if data is None else unpack(data)


def load_result(analysis_id: str, *, epoch: int | None = None, config: Any = None) -> Any:
    """A stored result of an earlier or running analysis ("old information"): the final
    aggregate, or with `epoch` the aggregate of that epoch (kept as its checkpoint).

    Reads the storage configured by FLAME_STORAGE__* (or `config`), SHA-256 verified.
    """
    from flame.clients.minio_client import open_store
    from flame.config import load_config

    config = config if config is not None else load_config()
    store = open_store(config.storage)
    if store is None:
        raise ConfigError(
            "FLAME_STORAGE__ENDPOINT or FLAME_STORAGE__RESULTS_DIR: needed to read stored results"
        )
    layout = AnalysisLayout(analysis_id)
    what = "final result" if epoch is None else f"aggregate of epoch {epoch}"
    roster = _roster(config) if config.roster is not None else None
    reads = RunReads(store, layout, roster=roster, aggregator_id=config.aggregator_id)
    try:
        if epoch is not None:  # only an epoch of the run every listed checkpoint is of
            return reads.epoch_value(epoch, reads.checkpoint(epoch, reads.newest()))
        manifest, _ = reads.manifest()
        return reads.final_value(manifest)
    except ObjectNotFound:
        raise FlameError(f"analysis {analysis_id!r} has no stored {what}") from None


def _comparable(field: str, value: Any) -> Any:
    """`value` as JSON stores it (participants in any order), to compare with a record."""
    plain = json.loads(json.dumps(to_jsonable(value), sort_keys=True))
    if field == "participants" and isinstance(plain, list):
        return sorted(plain, key=str)
    return plain


def _roster(config: FlameConfig) -> Roster:
    from flame.identity import Roster

    assert config.roster is not None
    return Roster.load(config.roster)


def code_hash(functions: AnalysisFunctions) -> str:
    """SHA-256 over the analyst's code (provenance): the source files defining the functions,
    or for code with no file (`python -c`, a notebook) its source text or bytecode."""
    from flame.analysis.code_hash import code_hash as hash_code

    return hash_code(
        (role, getattr(functions, role)) for role in ("analyze", "aggregate", "converged")
    )


def _has_storage(config: FlameConfig) -> bool:
    return config.storage.endpoint is not None or config.storage.results_dir is not None


def open_run_store(
    config: FlameConfig,
    functions: AnalysisFunctions,
    aggregator_id: str,
    code: str | None = None,
    auth: Authenticator | None = None,
) -> RunStore | None:
    """Checkpoints and final results on the configured storage (None: keep nothing).
    `code`: the analysis's SHA-256 when known (else that of the functions' files); `auth`:
    the aggregator's identity and roster (its records are then signed and verified)."""
    if not _has_storage(config):
        return None  # without importing the S3 client: a simulation starts faster
    from flame.clients.minio_client import open_store

    store = open_store(config.storage)
    if store is None:
        return None
    provenance = {
        "code_sha256": code if code is not None else code_hash(functions),
        "roster_sha256": _roster_fingerprint(config),
        "participants": list(config.participants),
        "has_converged": functions.converged is not None,  # a report's "converged" means it
        "config": config.public_dict(),
        "params": dict(config.params),
    }
    return StorageRunStore(
        store,
        config.analysis_id,
        aggregator_id,
        provenance=provenance,
        retry_s=config.storage.retry_s,
        auth=auth,
        shared=config.storage.claim_check,
    )


def _roster_fingerprint(config: FlameConfig) -> str | None:
    """The SHA-256 of the roster the run uses (None: unsigned, or a simulation's throwaway)."""
    if config.roster is None:
        return None
    from flame.identity import Roster

    return Roster.load(config.roster).fingerprint


def open_node_state(config: FlameConfig, node_id: str, *, simulated: bool = False) -> Any:
    """Where `context().save/load` keep this node's values."""
    if not _has_storage(config):
        return MemoryState(whole_run_here=simulated)
    from flame.clients.minio_client import open_store

    store = open_store(config.storage)
    return MemoryState() if store is None else NodeState(store, config.analysis_id, node_id)

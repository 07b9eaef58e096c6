"""Run status: what each node is doing, what each epoch took, where the final result is.

Two sources, both of which the run keeps anyway, so looking costs the run nothing:

* the broker's retained status of every node (`flame/{analysis}/{node}/status`, a JSON
  object: state, role, epoch, time, progress, reason, ...), the live picture;
* storage, when configured: the aggregator's checkpoints and the final manifest (epoch
  history, result key and SHA-256), the lasting record once the nodes have gone offline.

`StatusClient` reads them and never writes: no retained message, no object, no bucket.
`watch` follows a live run and reports every change until the aggregator is done or failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from flame.config import FlameConfig, load_config
from flame.errors import FlameError, RunTimeout
from flame.ops.check import BrokerUnavailable, _stop, broker_username, connect_broker
from flame.transport.status_order import StatusOrder, process_fields

__all__ = [
    "EpochInfo",
    "FinalResult",
    "NodeStatus",
    "RunStatus",
    "StatusChange",
    "StatusClient",
    "StatusError",
    "download",
    "get",
    "watch",
]

log = logging.getLogger(__name__)

FINAL_STATES = ("done", "failed")
MAX_STATUS_BYTES = 64 * 1024
_SETTLE = 0.3  # seconds without a new retained message before a snapshot counts as complete
_GRACE = 3.0  # seconds to wait for the nodes' final states after the aggregator's


class StatusError(FlameError):
    """Status could not be read (no broker or storage configured, or neither reachable)."""


@dataclass(frozen=True)
class NodeStatus:
    """One node's retained status, as it published it."""

    node: str
    state: str
    role: str | None = None
    epoch: int | None = None
    time: float | None = None
    progress: float | None = None
    reason: str | None = None
    session: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # Signed by that node's roster key (True), not (False), or no roster to check with (None).
    verified: bool | None = field(default=None, compare=False)
    # The node's state now (True), or a status of another run / an earlier status replayed or
    # left over (False, `stale` says why); None: it carries nothing to tell (older flame).
    current: bool | None = field(default=None, compare=False)
    stale: str | None = field(default=None, compare=False)

    @classmethod
    def from_payload(cls, node: str, payload: Any) -> NodeStatus | None:
        """The status in `payload` (a JSON object), or None if it is not one."""
        if not isinstance(payload, dict) or not isinstance(payload.get("state"), str):
            return None

        def num(key: str) -> float | None:
            value = payload.get(key)
            return (
                float(value)
                if isinstance(value, int | float) and not isinstance(value, bool)
                else None
            )

        epoch = payload.get("epoch")
        known = {"state", "role", "epoch", "time", "progress", "reason", "session", "sig"}
        return cls(
            node=node,
            state=payload["state"][:64],
            role=str(payload["role"])[:32] if isinstance(payload.get("role"), str) else None,
            epoch=epoch
            if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0
            else None,
            time=num("time"),
            progress=num("progress"),
            reason=str(payload["reason"])[:500] if payload.get("reason") else None,
            session=str(payload["session"])[:64] if payload.get("session") else None,
            extra={k: v for k, v in payload.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "state": self.state,
            "role": self.role,
            "epoch": self.epoch,
            "time": self.time,
            "progress": self.progress,
            "reason": self.reason,
            "verified": self.verified,
            "current": self.current,
            **({"stale": self.stale} if self.stale else {}),
            **self.extra,
        }

    def describe(self) -> str:
        """`computing epoch 2 (40%)`, `failed in epoch 1: ValueError: ...`, `offline`."""
        text = self.state
        last = self.extra.get("last_state")
        if self.state == "offline" and isinstance(last, str) and last:
            text += f" (last: {last[:64]})"
        if self.epoch is not None and self.state not in ("offline",):
            text += f" {'in ' if self.state == 'failed' else ''}epoch {self.epoch}"
        if self.state == "computing" and self.progress is not None:
            text += f" ({self.progress:.0%})"
        if self.reason:
            text += f": {self.reason}"
        if self.current is False:
            text += f"  [NOT CURRENT: {self.stale or 'stale'}]"
        return text

    def fields(self) -> dict[str, Any]:
        """The status as the node published it (what `StatusOrder` looks at)."""
        return {**self.extra, "state": self.state}


@dataclass(frozen=True)
class EpochInfo:
    """One epoch as the aggregator recorded it: who answered, when it started, how long."""

    epoch: int
    nodes: list[str]
    missing: list[str]
    started: float | None
    duration: float | None
    converged: bool = False

    @classmethod
    def from_dict(cls, data: Any) -> EpochInfo | None:
        if not isinstance(data, dict) or not isinstance(data.get("epoch"), int):
            return None
        started = data.get("started")
        duration = data.get("duration_s", data.get("duration"))
        return cls(
            epoch=int(data["epoch"]),
            nodes=[str(n) for n in data.get("nodes") or []],
            missing=[str(n) for n in data.get("missing") or []],
            started=float(started) if isinstance(started, int | float) else None,
            duration=float(duration) if isinstance(duration, int | float) else None,
            converged=bool(data.get("converged", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "nodes": self.nodes,
            "missing": self.missing,
            "started": self.started,
            "duration_s": self.duration,
            "converged": self.converged,
        }


@dataclass(frozen=True)
class FinalResult:
    """Where the final result is and what it must hash to."""

    key: str
    location: str
    sha256: str | None
    size: int | None
    created: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "location": self.location,
            "sha256": self.sha256,
            "size": self.size,
            "created": self.created,
        }


@dataclass
class RunStatus:
    """Everything known about one analysis run."""

    analysis_id: str
    nodes: dict[str, NodeStatus] = field(default_factory=dict)
    aggregator_id: str | None = None
    history: list[EpochInfo] = field(default_factory=list)
    final: FinalResult | None = None
    epochs: int | None = None
    converged: bool | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def aggregator(self) -> NodeStatus | None:
        for node, status in self.nodes.items():
            if status.role == "aggregation" or node == self.aggregator_id:
                return status
        return None

    @property
    def result_location(self) -> FinalResult | None:
        """The final result: from storage, else as the aggregator's status announced it."""
        if self.final is not None:
            return self.final
        aggregator = self.aggregator
        location = aggregator.extra.get("location") if aggregator is not None else None
        if aggregator is None or not isinstance(location, str) or not location:
            return None
        sha256 = aggregator.extra.get("sha256")
        return FinalResult("", location, sha256 if isinstance(sha256, str) else None, None)

    @property
    def state(self) -> Literal["finished", "failed", "running", "unknown"]:
        """From current statuses only: a replayed or left-over one does not set the state."""
        aggregator = self.aggregator
        if aggregator is not None and aggregator.current is False:
            aggregator = None
        if aggregator is not None and aggregator.state == "failed":
            return "failed"
        if self.final is not None or (aggregator is not None and aggregator.state == "done"):
            return "finished"
        # Without the aggregator's current status, nodes that said goodbye do not make a run.
        if any(
            s.state != "offline"
            and s.current is not False
            and (aggregator is not None or s.extra.get("online") is not False)
            for s in self.nodes.values()
        ):
            return "running"
        return "unknown"

    def to_dict(self) -> dict[str, Any]:
        return {
            "analysis_id": self.analysis_id,
            "state": self.state,
            "nodes": {node: s.to_dict() for node, s in sorted(self.nodes.items())},
            "history": [record.to_dict() for record in self.history],
            "final": final.to_dict() if (final := self.result_location) else None,
            "epochs": self.epochs,
            "converged": self.converged,
            "problems": self.problems,
        }


@dataclass(frozen=True)
class StatusChange:
    """What `watch` reports: a node's new status, or an epoch the aggregator completed."""

    kind: Literal["watching", "node", "epoch", "end"]
    at: float
    node: NodeStatus | None = None
    previous: NodeStatus | None = None
    epoch: EpochInfo | None = None
    run: RunStatus | None = None


def _parse_status(
    node: str, payload: bytes, check: Callable[[str, dict[str, Any]], bool] | None = None
) -> NodeStatus | None:
    if not payload or len(payload) > MAX_STATUS_BYTES:
        return None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    status = NodeStatus.from_payload(node, data)
    if status is not None and check is not None:
        status = replace(status, verified=check(node, data))
    return status


class StatusClient:
    """Reads a run's status from the broker and storage of a flame config.

    The config is the operator's (or a node's): broker URL and credentials, storage endpoint
    and credentials. The analysis to look at is an argument, so one config can look at many.
    """

    def __init__(self, config: FlameConfig | None = None, *, timeout: float = 5.0) -> None:
        self.config = config if config is not None else load_config()
        self.timeout = timeout
        self._store: Any = None
        self._roster: Any = None

    def _checker(self, analysis_id: str) -> Callable[[str, dict[str, Any]], bool] | None:
        """Signature check of statuses against FLAME_ROSTER (None: no roster configured)."""
        if self.config.roster is None:
            return None
        from flame.identity import Roster, status_signed_by

        if self._roster is None:
            self._roster = Roster.load(self.config.roster)
        roster = self._roster
        return lambda node, data: status_signed_by(roster, analysis_id, node, data)

    # --- broker ------------------------------------------------------------------------------
    def _subscribe(self, analysis_id: str) -> tuple[Any, queue.Queue[tuple[str, bytes]]]:
        from flame.clients.token import TokenSource
        from flame.transport.mqtt import status_topic

        settings = self.config.broker
        if settings.url is None:
            raise StatusError("no broker configured (FLAME_BROKER__URL)")
        inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        topic = status_topic(analysis_id, "+")
        prefix, suffix = topic.split("+", 1)

        def on_message(_client: Any, _userdata: Any, message: Any) -> None:
            name = str(message.topic)
            if name.startswith(prefix) and name.endswith(suffix):
                inbox.put((name[len(prefix) : len(name) - len(suffix)], bytes(message.payload)))

        token = TokenSource(settings, "broker").get()
        try:
            client = connect_broker(
                settings,
                timeout=self.timeout,
                username=broker_username(settings, self.config.node_id, token),
                token=token,
                on_message=on_message,
            )
        except BrokerUnavailable as exc:
            raise StatusError(f"broker: {exc.reason} \u2014 {exc.fix}") from None
        result, _mid = client.subscribe(topic, qos=1)
        if result != 0:
            _stop(client)
            raise StatusError(f"broker: could not subscribe to {topic} (code {result})")
        return client, inbox

    def nodes(self, analysis_id: str) -> dict[str, NodeStatus]:
        """Every node's retained status now (retained messages arrive right after SUBACK)."""
        client, inbox = self._subscribe(analysis_id)
        found: dict[str, NodeStatus] = {}
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                try:
                    node, payload = inbox.get(timeout=_SETTLE)
                except queue.Empty:
                    break
                status = _parse_status(node, payload, self._checker(analysis_id))
                if status is not None:
                    found[node] = status
                elif not payload:
                    found.pop(node, None)
        finally:
            _stop(client)
        return _mark_current(dict(sorted(found.items())))

    # --- storage -----------------------------------------------------------------------------
    def _storage(self) -> Any:
        if self._store is None:
            from flame.clients.minio_client import open_store

            settings = self.config.storage
            quick = settings.model_copy(update={"timeout": min(self.timeout, settings.timeout)})
            self._store = open_store(quick)
        return self._store

    @property
    def has_storage(self) -> bool:
        storage = self.config.storage
        return storage.endpoint is not None or storage.results_dir is not None

    def manifest(self, analysis_id: str) -> dict[str, Any] | None:
        """The final manifest the aggregator wrote, or None while the run is not finished."""
        from flame.clients.object_store import AnalysisLayout, ObjectNotFound

        store = self._storage()
        if store is None:
            return None
        try:
            data = store.get_json(AnalysisLayout(analysis_id).manifest())
        except ObjectNotFound:
            return None
        return data if isinstance(data, dict) else None

    def forwarded_logs(self, analysis_id: str) -> list[str] | None:
        """The nodes' forwarded log lines the aggregator kept with the run (storage only:
        they are never in a status on the broker); None without storage or lines."""
        from flame.aggregator.run_store import forwarded_logs_key
        from flame.clients.object_store import ObjectNotFound

        store = self._storage()
        if store is None:
            return None
        try:
            data = store.get_json(forwarded_logs_key(analysis_id))
        except ObjectNotFound:
            return None
        lines = data.get("lines") if isinstance(data, dict) else None
        return [str(line) for line in lines] if isinstance(lines, list) else None

    def history(self, analysis_id: str) -> list[EpochInfo]:
        """Per-epoch records: from the manifest when finished, else the latest checkpoint."""
        from flame.clients.object_store import AnalysisLayout, ObjectNotFound

        manifest = self.manifest(analysis_id)
        records: Any = manifest.get("history") if manifest else None
        store = self._storage()
        if records is None and store is not None:
            layout = AnalysisLayout(analysis_id)
            latest = layout.latest_checkpoint(store)
            if latest is not None:
                try:
                    checkpoint = store.get_json(layout.checkpoint(latest))
                except ObjectNotFound:
                    checkpoint = None
                records = checkpoint.get("history") if isinstance(checkpoint, dict) else None
        parsed = [EpochInfo.from_dict(item) for item in records or []]
        return [record for record in parsed if record is not None]

    def final(self, analysis_id: str) -> FinalResult | None:
        """The final result's key, location and SHA-256, or None if there is none yet."""
        from flame.clients.object_store import AnalysisLayout, ObjectNotFound

        store = self._storage()
        if store is None:
            return None
        key = AnalysisLayout(analysis_id).final_result()
        try:
            stored = store.stat(key)
        except ObjectNotFound:
            return None
        manifest = self.manifest(analysis_id) or {}
        location = stored.uri or str(getattr(store, "root", "")) + "/" + key
        return FinalResult(
            key=key,
            location=location,
            sha256=stored.sha256,
            size=stored.size,
            created=manifest.get("created") if isinstance(manifest.get("created"), str) else None,
        )

    # --- together ----------------------------------------------------------------------------
    def status(self, analysis_id: str) -> RunStatus:
        """Nodes from the broker and history / final result from storage, whichever are set.

        A source that cannot be reached is named in `problems`; the other still answers.
        """
        from flame.clients.object_store import AnalysisLayout

        AnalysisLayout(analysis_id)  # validates the id before it goes into a topic or a key
        if self.config.broker.url is None and not self.has_storage:
            raise StatusError(
                "nothing to ask: configure the broker (FLAME_BROKER__URL) and/or storage "
                "(FLAME_STORAGE__ENDPOINT or FLAME_STORAGE__RESULTS_DIR)"
            )
        run = RunStatus(analysis_id, aggregator_id=self.config.aggregator_id)
        if self.config.broker.url is not None:
            try:
                run.nodes = self.nodes(analysis_id)
            except FlameError as exc:
                run.problems.append(str(exc))
        if self.has_storage:
            try:
                run.history = self.history(analysis_id)
                run.final = self.final(analysis_id)
                manifest = self.manifest(analysis_id)
                if manifest is not None:
                    epochs = manifest.get("epochs")
                    run.epochs = epochs if isinstance(epochs, int) else None
                    run.converged = bool(manifest.get("converged", False))
            except FlameError as exc:
                run.problems.append(f"storage: {exc}")
        if run.epochs is None and run.history:
            run.epochs = len(run.history)
        return run

    def download(self, analysis_id: str, path: Path) -> FinalResult:
        """Fetch the final result to `path`, verified against the SHA-256 the aggregator
        recorded; nothing appears at `path` unless it matches."""
        from flame.clients.object_store import AnalysisLayout, IntegrityError, ObjectNotFound

        store = self._storage()
        if store is None:
            raise StatusError(
                "no storage configured (FLAME_STORAGE__ENDPOINT or FLAME_STORAGE__RESULTS_DIR)"
            )
        final = self.final(analysis_id)
        if final is None:
            raise StatusError(f"analysis {analysis_id!r} has no final result in storage yet")
        manifest = self.manifest(analysis_id) or {}
        recorded = manifest.get("result", {}).get("sha256") if manifest else None
        expected = recorded if isinstance(recorded, str) else final.sha256
        partial = path.with_name(f".{path.name}.part")
        try:
            store.get_to_file(AnalysisLayout(analysis_id).final_result(), partial)
            digest = hashlib.sha256()
            with partial.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            if expected is not None and digest.hexdigest() != expected:
                raise IntegrityError(
                    f"{final.location}: SHA-256 {digest.hexdigest()} does not match the "
                    f"recorded {expected}"
                )
            partial.replace(path)
        except ObjectNotFound:
            raise StatusError(f"{final.location} disappeared before it could be read") from None
        finally:
            partial.unlink(missing_ok=True)
        return replace(final, sha256=digest.hexdigest(), size=path.stat().st_size)

    def result(self, analysis_id: str) -> Any:
        """The final aggregate itself (verified, decoded from flame's storage format)."""
        from flame.clients.object_store import AnalysisLayout
        from flame.wire.envelope import unpack

        store = self._storage()
        if store is None:
            raise StatusError("no storage configured")
        return unpack(store.get_bytes(AnalysisLayout(analysis_id).final_result()))

    # --- following a live run ----------------------------------------------------------------
    def watch(self, analysis_id: str, *, timeout: float | None = None) -> Iterator[StatusChange]:
        """Every node status change, and every epoch the aggregator completes, as they happen.

        Starts with a change of kind "watching" once subscribed (from then on no change is
        missed) and ends with one of kind "end" once the aggregator is done or failed (or,
        when watching starts after the run, once storage holds its final result). Raises
        `RunTimeout` if neither happens within `timeout` seconds.
        """
        if timeout is None:
            config = self.config
            timeout = config.presence_timeout + config.epochs * config.epoch_timeout + 60
        client, inbox = self._subscribe(analysis_id)
        deadline = time.monotonic() + timeout
        order = StatusOrder()
        signed = self.config.roster is not None
        known: dict[str, NodeStatus] = {}
        last_real: dict[str, NodeStatus] = {}  # each node's last status other than offline
        epoch_start: dict[int, float] = {}
        answered: dict[int, dict[str, float]] = {}
        reported: set[int] = set()
        settled = False
        ending: float | None = None  # when the aggregator ended: the nodes' last words follow
        try:
            yield StatusChange("watching", time.time())
            while True:
                now_mono = time.monotonic()
                if ending is not None and (
                    now_mono >= ending or _all_settled(known, self.config.aggregator_id)
                ):
                    yield self._end(analysis_id, known, last_real)
                    return
                left = (ending if ending is not None else deadline) - now_mono
                if ending is None and left <= 0:
                    raise RunTimeout(
                        f"analysis {analysis_id!r} did not finish within {timeout:g} s"
                    )
                try:
                    node, payload = inbox.get(timeout=max(0.01, min(left, _SETTLE)))
                except queue.Empty:
                    if not settled:
                        settled = True
                        if self._finished_in_storage(analysis_id, known):
                            yield self._end(analysis_id, known, last_real)
                            return
                    continue
                status = _parse_status(node, payload, self._checker(analysis_id))
                if status is None:
                    continue
                stale = (
                    "bad or no signature"
                    if status.verified is False
                    else order.check(node, status.fields(), signed=signed)
                )
                if stale is not None:  # shown, but it changes nothing (nor ends the watch)
                    shown = replace(status, current=False, stale=stale)
                    yield StatusChange("node", time.time(), node=shown, previous=known.get(node))
                    continue
                status = replace(status, current=True)
                previous = known.get(node)
                if previous is not None and _same(previous, status):
                    continue
                known[node] = status
                if status.state != "offline":
                    last_real[node] = status
                now = status.time or time.time()
                is_aggregator = status.role == "aggregation" or node == self.config.aggregator_id
                if is_aggregator and status.epoch is not None:
                    if status.state == "collecting":
                        epoch_start.setdefault(status.epoch, now)
                    for finished in sorted(epoch_start):
                        ends = status.epoch > finished or status.state in FINAL_STATES
                        if ends and finished not in reported:
                            reported.add(finished)
                            record = self._epoch(
                                analysis_id, finished, epoch_start, answered, last_real, now
                            )
                            yield StatusChange("epoch", now, epoch=record)
                if status.state == "sent" and status.epoch is not None:
                    answered.setdefault(status.epoch, {})[node] = now
                yield StatusChange("node", now, node=status, previous=previous)
                if is_aggregator and status.state in FINAL_STATES and ending is None:
                    ending = time.monotonic() + _GRACE
        finally:
            _stop(client)

    def _epoch(
        self,
        analysis_id: str,
        epoch: int,
        starts: dict[int, float],
        answered: dict[int, dict[str, float]],
        known: dict[str, NodeStatus],
        now: float,
    ) -> EpochInfo:
        """The aggregator's own record of `epoch` when storage has it (the aggregator
        checkpoints before it moves on), else what the nodes' statuses showed."""
        aggregator = known.get(self.config.aggregator_id)
        announced = EpochInfo.from_dict(aggregator.extra.get("last_epoch")) if aggregator else None
        if announced is not None and announced.epoch == epoch:
            return announced
        if self.has_storage:
            try:
                for record in self.history(analysis_id):
                    if record.epoch == epoch:
                        return record
            except FlameError as exc:
                log.debug("storage not readable while watching: %s", exc)
        nodes = sorted(
            node
            for node, status in known.items()
            if node in answered.get(epoch, {})
            or (status.role == "analysis" and status.epoch is not None and status.epoch > epoch)
        )
        participants = sorted(
            node for node, s in known.items() if s.role == "analysis" or node in nodes
        )
        start = starts.get(epoch)
        return EpochInfo(
            epoch=epoch,
            nodes=nodes,
            missing=[n for n in participants if n not in nodes],
            started=start,
            duration=(now - start) if start is not None else None,
        )

    def _finished_in_storage(self, analysis_id: str, known: dict[str, NodeStatus]) -> bool:
        """A run that ended before watching began: every node offline, a final result stored."""
        if not self.has_storage or any(s.state != "offline" for s in known.values()):
            return False
        try:
            return self.final(analysis_id) is not None
        except FlameError as exc:
            log.debug("storage not readable while watching: %s", exc)
            return False

    def _end(
        self, analysis_id: str, known: dict[str, NodeStatus], last_real: dict[str, NodeStatus]
    ) -> StatusChange:
        """The run as it ended: a node that said done or failed and then left keeps that
        state in the summary (its retained status says only "offline" by now)."""
        nodes = {
            node: last_real[node]
            if status.state == "offline"
            and node in last_real
            and last_real[node].state in FINAL_STATES
            else status
            for node, status in sorted(known.items())
        }
        run = RunStatus(analysis_id, nodes=nodes, aggregator_id=self.config.aggregator_id)
        if self.has_storage:
            try:
                run.history = self.history(analysis_id)
                run.final = self.final(analysis_id)
            except FlameError as exc:
                run.problems.append(f"storage: {exc}")
        return StatusChange("end", time.time(), run=run)


def _mark_current(found: dict[str, NodeStatus]) -> dict[str, NodeStatus]:
    """Each status marked current or not, from one snapshot of the retained statuses.

    The run now is the one named by the most recently signed (verified) status; a status of
    another run is a leftover or a replay (`flame.transport.status_order`). A snapshot cannot
    tell more: a replay of a whole earlier run, every node at once, looks like that run."""
    newest: tuple[float, str] | None = None
    for status in found.values():
        fields = process_fields(status.fields())
        run = status.extra.get("run")
        usable = fields is not None and isinstance(run, str) and status.verified is not False
        if usable and fields is not None and (newest is None or fields[3] > newest[0]):
            newest = (fields[3], str(run))
    marked = {}
    for node, status in found.items():
        run = status.extra.get("run")
        if status.verified is False:
            status = replace(status, current=False, stale="bad or no signature")
        elif newest is not None and isinstance(run, str) and run != newest[1]:
            stale = f"of run {run[:16]}, not the newest run {newest[1][:16]}"
            status = replace(status, current=False, stale=stale)
        elif process_fields(status.fields()) is not None:
            status = replace(status, current=True)
        marked[node] = status
    return marked


def _all_settled(known: dict[str, NodeStatus], aggregator_id: str) -> bool:
    """Every analysis node has said its last word (done, failed) or gone offline."""
    return all(
        status.state in (*FINAL_STATES, "offline")
        for node, status in known.items()
        if node != aggregator_id and status.role != "aggregation"
    )


def _same(a: NodeStatus, b: NodeStatus) -> bool:
    return (a.state, a.epoch, a.progress, a.reason, a.session) == (
        b.state,
        b.epoch,
        b.progress,
        b.reason,
        b.session,
    )


# ------------------------------------------------------------------------- module helpers


def get(analysis_id: str, config: FlameConfig | None = None, *, timeout: float = 5.0) -> RunStatus:
    """The status of `analysis_id`, read with `config` (default: FLAME_* / FLAME_CONFIG)."""
    return StatusClient(config, timeout=timeout).status(analysis_id)


def watch(
    analysis_id: str, config: FlameConfig | None = None, *, timeout: float | None = None
) -> Iterator[StatusChange]:
    """Follow a live run; see `StatusClient.watch`."""
    return StatusClient(config).watch(analysis_id, timeout=timeout)


def download(analysis_id: str, path: Path, config: FlameConfig | None = None) -> FinalResult:
    """Fetch and verify the final result; see `StatusClient.download`."""
    return StatusClient(config).download(analysis_id, path)


# ------------------------------------------------------------------------- rendering (CLI)


def _clock(moment: float | None) -> str:
    if moment is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(moment))


def render_status(run: RunStatus) -> list[str]:
    """The lines `flame status` prints for a snapshot."""
    lines: list[str] = []
    head = f"analysis {run.analysis_id}: {run.state}"
    if run.epochs is not None:
        head += f" after {run.epochs} epoch{'s' if run.epochs != 1 else ''}"
    if run.converged:
        head += ", converged"
    lines.append(head)
    for problem in run.problems:
        lines.append(f"  ! {problem}")
    if run.nodes:
        lines.append("nodes")
        width = max(len(node) for node in run.nodes)
        for node, status in sorted(
            run.nodes.items(), key=lambda item: (item[1].role != "aggregation", item[0])
        ):
            role = status.role or ""
            at = f"  (at {_clock(status.time)})" if status.time is not None else ""
            signed = ""
            if status.verified is not None:
                signed = (
                    "  [signed, verified]"
                    if status.verified
                    else "  [NOT VERIFIED: bad or no signature]"
                )
            lines.append(f"  {node:<{width}}  {role:<11}  {status.describe()}{at}{signed}")
    if run.history:
        lines.append("epochs")
        for record in run.history:
            lines.append("  " + render_epoch(record))
    final = run.result_location
    if final is not None:
        lines.append("final result")
        size = f", {final.size} bytes" if final.size is not None else ""
        lines.append(f"  {final.location}{size}")
        if final.sha256:
            lines.append(f"  sha256 {final.sha256}")
    return lines


def render_epoch(record: EpochInfo) -> str:
    answered = len(record.nodes)
    total = answered + len(record.missing)
    text = f"epoch {record.epoch}: {answered}/{total} answered"
    if record.nodes:
        text += f" ({', '.join(record.nodes)})"
    if record.missing:
        text += f", missing {', '.join(record.missing)}"
    if record.started is not None:
        text += f", started {_clock(record.started)}"
    if record.duration is not None:
        text += f", {record.duration:.3f} s"
    if record.converged:
        text += ", converged"
    return text


def render_change(change: StatusChange) -> str:
    """One line per change for `flame status --watch`."""
    stamp = _clock(change.at)
    if change.kind == "node" and change.node is not None:
        node = change.node
        role = f" ({node.role})" if node.role == "aggregation" else ""
        return f"{stamp} {node.node}{role}: {node.describe()}"
    if change.kind == "epoch" and change.epoch is not None:
        return f"{stamp} {render_epoch(change.epoch)}"
    if change.kind == "watching":
        return f"{stamp} watching"
    run = change.run
    state = run.state if run is not None else "ended"
    return f"{stamp} run {state}"

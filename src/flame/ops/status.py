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
import logging
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from flame.config import FlameConfig, load_config
from flame.errors import FlameError, RunTimeout
from flame.ops.broker_probe import BrokerUnavailable, broker_username, connect_broker, stop_client
from flame.ops.status_records import (
    FINAL_STATES,
    EpochInfo,
    FinalResult,
    NodeStatus,
    RunStatus,
    StatusChange,
    StatusError,
    _all_settled,
    _mark_current,
    _parse_status,
    _same,
)
from flame.ops.status_render import render_change, render_epoch, render_status
from flame.ops.status_storage import newest_checkpoint, of_this_run, trusted_record
from flame.transport.status_order import StatusOrder

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
    "render_change",
    "render_epoch",
    "render_status",
    "watch",
]

log = logging.getLogger(__name__)

_SETTLE = 0.3  # seconds without a new retained message before a snapshot counts as complete
_GRACE = 3.0  # seconds to wait for the nodes' final states after the aggregator's


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
            stop_client(client)
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
            stop_client(client)
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
        layout = AnalysisLayout(analysis_id)
        key = layout.manifest()
        try:
            data = store.get_json(key)
        except ObjectNotFound:
            return None
        manifest = trusted_record(self.config, analysis_id, key, data)  # signed, with a roster
        if manifest is not None:
            of_this_run(self.config, store, layout, manifest)
        return manifest

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
        from flame.clients.object_store import AnalysisLayout

        manifest = self.manifest(analysis_id)
        records: Any = manifest.get("history") if manifest else None
        store = self._storage()
        if records is None and store is not None:
            checkpoint = newest_checkpoint(self.config, store, AnalysisLayout(analysis_id))
            records = checkpoint.get("history") if checkpoint is not None else None
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
        named = manifest.get("result")
        if self.config.roster is not None and (
            not isinstance(named, dict) or named.get("sha256") != stored.sha256
        ):
            return None  # no signed manifest names these bytes: not shown as the result
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
        """The final aggregate itself, decoded from flame's storage format and verified as
        `flame.load_result` verifies it (against the manifest, signed with a roster)."""
        from flame.aggregator.run_store import load_result

        if self._storage() is None:
            raise StatusError("no storage configured")
        return load_result(analysis_id, config=self.config)

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
            stop_client(client)

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

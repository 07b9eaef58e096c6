"""Reading a run's stored records and results back, checked the way the aggregator checks them.

Every reader of a run's storage (`flame.load_result`, `StatusClient.result`, `flame report`,
`flame status`, a resuming aggregator) goes through `RunReads`, so all of them give the same
verdict on the same bucket and none acts on what a holder of the storage credentials planted:

* a record is used only if the roster's aggregator signed it (with a roster), and then only
  if it names its run and sizes (a stripped, old-format record is not a silent downgrade);
* the bytes a record names are read no further than the size it names and must hash to it;
* the run is what EVERY listed checkpoint says (`newest_verified_run`): epochs 0..n without a
  gap, all of one run; a listing mixing runs (an earlier run's checkpoint put back beside a
  re-run's) is refused, not decided by whichever sorts last;
* a final manifest counts only for that run and only one or two epochs after its newest
  checkpoint (the last epoch is not checkpointed), and a per-epoch read only for that run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flame.aggregator.signed_store import check_sha256, verify_record
from flame.clients.object_store import ObjectNotFound
from flame.errors import ConfigError
from flame.wire.envelope import unpack

if TYPE_CHECKING:
    from flame.clients.object_store import AnalysisLayout, ObjectStore
    from flame.identity.roster import Roster

__all__ = [
    "NewestRun",
    "RunReads",
    "check_final_run",
    "named_bytes",
    "newest_verified_run",
    "verified_record",
]


def verified_record(
    store: ObjectStore,
    layout: AnalysisLayout,
    key: str,
    *,
    roster: Roster | None,
    aggregator_id: str,
) -> dict[str, Any]:
    """The JSON record under `key`: signed by the roster's aggregator when `roster` is given
    (ConfigError naming the object otherwise); ObjectNotFound if there is none."""
    record = store.get_json(key)
    if roster is None:
        if not isinstance(record, dict):
            raise ConfigError(f"storage object {key!r}: not a JSON object")
        return record
    return verify_record(roster, aggregator_id, layout.analysis_id, key, record)


def named_bytes(store: ObjectStore, key: str, sha256: Any, size: Any) -> bytes:
    """The bytes a verified record names: no more than its `size` read into memory (when it
    names one), and their SHA-256 the one it names; ConfigError otherwise."""
    if _is_int(size):
        if store.stat(key).size != size:
            raise ConfigError(
                f"storage object {key!r}: its size (so its SHA-256) is not the one its "
                "manifest names (altered or replaced); not using it"
            )
        data = store.get_bytes(key, max_bytes=size)
    else:  # a record written before sizes were recorded (no roster): the SHA-256 decides
        data = store.get_bytes(key)
    check_sha256(key, data, sha256)
    return data


@dataclass(frozen=True)
class NewestRun:
    """What the listed checkpoints, all verified, say of the run they belong to."""

    epoch: int
    """The newest checkpointed epoch; -1 when there is no checkpoint."""
    run: str | None
    """The run id every checkpoint names (None: no checkpoint, or old records without one)."""
    record: dict[str, Any] | None
    """The newest checkpoint's verified record."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _complete(key: str, strict: bool, run: Any, size: Any) -> None:
    """With a roster a record must name its run and the size of its bytes: one stripped of
    them (or written before they were recorded) cannot show it is of this run."""
    if strict and not (isinstance(run, str) and _is_int(size)):
        raise ConfigError(
            f"storage object {key!r}: names no run or no size (stripped, or written by an "
            "older flame); not using it: remove it or use a new analysis id"
        )


def check_final_run(
    layout: AnalysisLayout, manifest: dict[str, Any], newest: NewestRun, *, strict: bool
) -> None:
    """Refuse a final manifest that is not the end of the run the checkpoints are of: of
    another run (the aggregator writes its final after its last checkpoint, under the same
    run), or naming other than one or two epochs after the newest checkpoint (the last epoch
    is not checkpointed, so a final of two or more epochs and no checkpoint at all is refused
    too; with a roster one naming no epoch count): an earlier run's final put back beside a
    re-run's checkpoints, alone or with some of its own checkpoints."""
    key = layout.manifest()
    named = manifest.get("result")
    size = named.get("size") if isinstance(named, dict) else None
    _complete(key, strict, manifest.get("run"), size)
    if newest.record is not None and manifest.get("run") != newest.run:
        raise ConfigError(
            f"storage object {key!r}: the final of another run than the newest checkpoint's "
            "(replayed or left from an earlier run); not using it"
        )
    epochs = manifest.get("epochs")
    if (strict or _is_int(epochs)) and not (
        _is_int(epochs) and epochs in (newest.epoch + 1, newest.epoch + 2)
    ):
        where = f"after epoch {newest.epoch}" if newest.record is not None else "none"
        raise ConfigError(
            f"storage object {key!r}: names {epochs!r} epochs, but the newest checkpoint is "
            f"{where} (a final of another run, or checkpoints removed); not using it"
        )


class RunReads:
    """One analysis's stored records, read as the aggregator would act on them again."""

    def __init__(
        self,
        store: ObjectStore,
        layout: AnalysisLayout,
        *,
        roster: Roster | None,
        aggregator_id: str,
    ) -> None:
        self.store, self.layout = store, layout
        self.roster, self.aggregator_id = roster, aggregator_id
        self.strict = roster is not None

    def record(self, key: str) -> dict[str, Any]:
        """A verified record (ObjectNotFound if there is none)."""
        return verified_record(
            self.store, self.layout, key, roster=self.roster, aggregator_id=self.aggregator_id
        )

    def newest(self) -> NewestRun:
        """Every listed checkpoint verified, and all of one run, epochs 0..n without a gap
        (as a run writes them); ConfigError naming the objects otherwise."""
        epochs = self.layout.checkpointed_epochs(self.store)
        root = f"{self.layout.root}epochs/"
        runs: set[str | None] = set()
        record: dict[str, Any] | None = None
        for epoch in epochs:
            key = self.layout.checkpoint(epoch)
            try:
                record = self.record(key)
            except ObjectNotFound:
                raise ConfigError(
                    f"storage object {key!r}: listed but gone; not using the run's records"
                ) from None
            _complete(key, self.strict, record.get("run"), record.get("aggregate_size"))
            if record.get("next_epoch") != epoch + 1:
                raise ConfigError(f"storage object {key!r}: not the checkpoint of its epoch")
            run = record.get("run")
            runs.add(run if isinstance(run, str) else None)
        if epochs != list(range(len(epochs))):  # after the signatures: those say more
            raise ConfigError(
                f"storage {root}: checkpoints of epochs {epochs[0]}..{epochs[-1]} with gaps (a "
                "run writes 0, 1, 2, ...; put back or removed); not using them: remove "
                f"{self.layout.root} or use a new analysis id"
            )
        if len(runs) > 1:
            raise ConfigError(
                f"storage {root}: checkpoints of more than one run (an earlier run's put back "
                f"beside this one's); not using them: remove {self.layout.root} or use a new "
                "analysis id"
            )
        return NewestRun(epochs[-1] if epochs else -1, runs.pop() if runs else None, record)

    def manifest(self) -> tuple[dict[str, Any], NewestRun]:
        """The verified final manifest, if it is the end of the checkpoints' run, and that
        run; ObjectNotFound when there is no manifest."""
        manifest = self.record(self.layout.manifest())
        newest = self.newest()
        check_final_run(self.layout, manifest, newest, strict=self.strict)
        return manifest, newest

    def checkpoint(self, epoch: int, newest: NewestRun) -> dict[str, Any]:
        """The verified checkpoint of `epoch`, of the run `newest` (ObjectNotFound if the run
        has no checkpoint of that epoch)."""
        key = self.layout.checkpoint(epoch)
        if not 0 <= epoch <= newest.epoch:
            raise ObjectNotFound(f"{key}: no such object")
        meta = newest.record if epoch == newest.epoch else self.record(key)
        assert meta is not None
        _complete(key, self.strict, meta.get("run"), meta.get("aggregate_size"))
        if meta.get("run") != newest.run:
            raise ConfigError(f"storage object {key!r}: of another run than its neighbours")
        return meta

    def final_value(self, manifest: dict[str, Any]) -> Any:
        """The final aggregate a verified manifest names."""
        named = manifest.get("result")
        if not isinstance(named, dict):
            raise ConfigError(f"storage object {self.layout.manifest()!r}: names no result")
        key = self.layout.final_result()
        return unpack(named_bytes(self.store, key, named.get("sha256"), named.get("size")))

    def epoch_value(self, epoch: int, meta: dict[str, Any]) -> Any:
        """The aggregate of `epoch` its verified checkpoint record `meta` names."""
        key = self.layout.epoch_result(epoch, self.aggregator_id)
        sha256, size = meta.get("aggregate_sha256"), meta.get("aggregate_size")
        return unpack(named_bytes(self.store, key, sha256, size))


def newest_verified_run(
    store: ObjectStore, layout: AnalysisLayout, *, roster: Roster | None, aggregator_id: str
) -> NewestRun:
    """`RunReads.newest`: the run every listed checkpoint is of (ConfigError if not one)."""
    return RunReads(store, layout, roster=roster, aggregator_id=aggregator_id).newest()

"""Reading a run's stored records and results back, checked the way the aggregator checks them.

Every reader of a run's storage (`flame.load_result`, `StatusClient.result`, `flame report`,
`flame status`, a resuming aggregator) goes through these, so none of them acts on what a
holder of the storage credentials planted: a record is used only if the roster's aggregator
signed it (with a roster), the bytes it names are read no further than the size it names and
must hash to its SHA-256, and a final manifest counts only for the run of the newest
checkpoint (a final of an earlier run put back under the same analysis id does not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flame.aggregator.signed_store import check_sha256, verify_record
from flame.errors import ConfigError
from flame.wire.envelope import unpack

if TYPE_CHECKING:
    from flame.clients.object_store import AnalysisLayout, ObjectStore
    from flame.identity.roster import Roster

__all__ = ["check_final_run", "epoch_value", "final_value", "named_bytes", "verified_record"]


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
    if isinstance(size, int) and not isinstance(size, bool):
        if store.stat(key).size != size:
            raise ConfigError(
                f"storage object {key!r}: its size (so its SHA-256) is not the one its "
                "manifest names (altered or replaced); not using it"
            )
        data = store.get_bytes(key, max_bytes=size)
    else:  # a record written before sizes were recorded: the SHA-256 still decides
        data = store.get_bytes(key)
    check_sha256(key, data, sha256)
    return data


def final_value(store: ObjectStore, layout: AnalysisLayout, manifest: dict[str, Any]) -> Any:
    """The final aggregate a verified manifest names."""
    named = manifest.get("result")
    if not isinstance(named, dict):
        raise ConfigError(f"storage object {layout.manifest()!r}: names no result")
    key = layout.final_result()
    return unpack(named_bytes(store, key, named.get("sha256"), named.get("size")))


def epoch_value(
    store: ObjectStore, layout: AnalysisLayout, aggregator_id: str, epoch: int, meta: dict[str, Any]
) -> Any:
    """The aggregate of `epoch` its verified checkpoint record `meta` names."""
    key = layout.epoch_result(epoch, aggregator_id)
    return unpack(named_bytes(store, key, meta.get("aggregate_sha256"), meta.get("aggregate_size")))


def check_final_run(
    layout: AnalysisLayout, manifest: dict[str, Any], newest: dict[str, Any] | None
) -> None:
    """Refuse a final manifest of another run than the newest (verified) checkpoint's: the
    aggregator writes its final after its last checkpoint, under the same run, so a final of
    an earlier run put back beside a re-run's checkpoints is a replay (or leftover)."""
    run = newest.get("run") if newest is not None else None
    if isinstance(run, str) and manifest.get("run") != run:
        raise ConfigError(
            f"storage object {layout.manifest()!r}: the final of another run than the newest "
            "checkpoint's (replayed or left from an earlier run); not using it"
        )

"""What `flame status` takes from the run's storage, checked like the aggregator checks it.

With the claim check every node can write the run's store, so a manifest is shown only if the
roster's aggregator signed it (when a roster is configured), and the full failure record
(reason, traceback: kept out of retained statuses, red team B2) is read from storage here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from flame.errors import ConfigError

if TYPE_CHECKING:
    from flame.config import FlameConfig

__all__ = ["failure_record", "of_this_run", "trusted_record"]

log = logging.getLogger(__name__)


def trusted_record(
    config: FlameConfig, analysis_id: str, key: str, data: Any
) -> dict[str, Any] | None:
    """`data` if it may be shown: a JSON object, signed by the roster's aggregator when a
    roster is configured (FLAME_ROSTER); else None, with a warning naming the object."""
    if not isinstance(data, dict):
        return None
    if config.roster is None:
        return data
    from flame.aggregator.signed_store import verify_record
    from flame.identity import Roster

    try:
        roster = Roster.load(config.roster)
        return verify_record(roster, config.aggregator_id, analysis_id, key, data)
    except (ConfigError, OSError, ValueError) as exc:
        log.warning("not shown: %s", exc)
        return None


def of_this_run(config: FlameConfig, store: Any, layout: Any, manifest: dict[str, Any]) -> None:
    """A final counts only for the run of the newest checkpoint (a final of an earlier run
    put back beside a re-run is not this run's end): StatusError otherwise."""
    from flame.aggregator.stored_reads import check_final_run
    from flame.clients.object_store import ObjectNotFound
    from flame.ops.status_records import StatusError

    newest = layout.latest_checkpoint(store)
    if newest is None:
        return
    key = layout.checkpoint(newest)
    try:
        checkpoint = trusted_record(config, layout.analysis_id, key, store.get_json(key))
    except ObjectNotFound:
        return
    if checkpoint is None:
        raise StatusError(f"{key}: not signed by the aggregator; the final is not shown")
    try:
        check_final_run(layout, manifest, checkpoint)
    except ConfigError as exc:
        raise StatusError(str(exc)) from None


def failure_record(
    store: Any, analysis_id: str, config: FlameConfig | None = None
) -> dict[str, Any] | None:
    """The latest failure record the aggregator kept with the run (reason, node, epoch,
    traceback), or None (no storage, none kept, a store shared with the nodes, or, with a
    roster in `config`, a record the aggregator did not sign: its text is not shown as the
    aggregator's words)."""
    from flame.clients.object_store import AnalysisLayout, StorageError

    if store is None:
        return None
    prefix = f"{AnalysisLayout(analysis_id).root}failures/"
    try:
        keys = sorted(key for key in store.list(prefix) if key.endswith(".json"))
        data = store.get_json(keys[-1]) if keys else None
    except (StorageError, OSError, ValueError) as exc:
        log.warning("could not read the failure record: %s", exc)
        return None
    if config is not None and keys:
        return trusted_record(config, analysis_id, keys[-1], data)
    return data if isinstance(data, dict) else None

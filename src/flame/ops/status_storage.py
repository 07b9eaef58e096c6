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
    from flame.aggregator.stored_reads import RunReads
    from flame.config import FlameConfig

__all__ = ["failure_record", "newest_checkpoint", "of_this_run", "run_reads", "trusted_record"]

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


def run_reads(config: FlameConfig, store: Any, layout: Any) -> RunReads:
    """The run's records read as every other reader reads them (`RunReads`)."""
    from flame.aggregator.stored_reads import RunReads

    roster = None
    if config.roster is not None:
        from flame.identity import Roster

        roster = Roster.load(config.roster)
    return RunReads(store, layout, roster=roster, aggregator_id=config.aggregator_id)


def newest_checkpoint(config: FlameConfig, store: Any, layout: Any) -> dict[str, Any] | None:
    """The newest checkpoint's record, if every listed checkpoint is verified and of one run
    (`newest_verified_run`); StatusError naming the problem otherwise."""
    from flame.ops.status_records import StatusError

    try:
        return run_reads(config, store, layout).newest().record
    except ConfigError as exc:
        raise StatusError(str(exc)) from None


def of_this_run(config: FlameConfig, store: Any, layout: Any, manifest: dict[str, Any]) -> None:
    """A final counts only as the end of the run every listed checkpoint is of (a final of
    an earlier run put back beside a re-run is not its end): StatusError otherwise, the
    verdict `flame.load_result` and `flame report` give on the same bucket."""
    from flame.aggregator.stored_reads import check_final_run
    from flame.ops.status_records import StatusError

    try:
        reads = run_reads(config, store, layout)
        check_final_run(layout, manifest, reads.newest(), strict=reads.strict)
    except ConfigError as exc:
        raise StatusError(str(exc)) from None


def failure_record(
    store: Any, analysis_id: str, config: FlameConfig | None = None
) -> dict[str, Any] | None:
    """The latest failure record the aggregator kept with the run (reason, node, epoch,
    traceback), or None (no storage, none kept, a store shared with the nodes). With a roster
    in `config` only one the aggregator signed (its text is shown as the aggregator's words)
    and of the run the checkpoints are of: the newest such, so neither a later-sorting planted
    record nor an earlier run's put back hides or replaces the genuine one."""
    from flame.clients.object_store import AnalysisLayout, StorageError
    from flame.errors import FlameError

    if store is None:
        return None
    layout = AnalysisLayout(analysis_id)
    strict = config is not None and config.roster is not None
    try:
        keys = sorted(k for k in store.list(f"{layout.root}failures/") if k.endswith(".json"))
        newest = run_reads(config, store, layout).newest() if config and strict else None
    except (FlameError, OSError, ValueError) as exc:
        log.warning("failure record not shown: %s", exc)
        return None
    for key in reversed(keys):
        try:
            data = store.get_json(key)
        except (StorageError, OSError, ValueError) as exc:
            log.warning("could not read the failure record %s: %s", key, exc)
            continue
        record = trusted_record(config, analysis_id, key, data) if config else data
        if not isinstance(record, dict):
            continue  # unsigned (warned) or not a record: an older one may be genuine
        if newest is not None and (
            not isinstance(record.get("run"), str)
            or (newest.record is not None and record.get("run") != newest.run)
        ):
            log.warning("not shown: %s: a failure record of another run", key)
            continue
        return record
    return None

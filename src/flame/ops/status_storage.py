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

__all__ = ["failure_record", "trusted_record"]

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


def failure_record(store: Any, analysis_id: str) -> dict[str, Any] | None:
    """The latest failure record the aggregator kept with the run (reason, node, epoch,
    traceback), or None (no storage, none kept, or a store shared with the nodes)."""
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
    return data if isinstance(data, dict) else None

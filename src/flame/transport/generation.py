"""A node's process generation, kept in its own storage as well as on the broker.

Why: processes of a node are ordered by their generation first (`status_order`), and the
generation used to come only from the node's retained status on the broker. A broker that
lost it (restarted without persistence, an operator clearing it, a clean-up between runs of
one analysis id) reset it to 1, so the next process with its clock stepped back was taken for
a stale replay of its predecessor and the run stalled. Now a process takes one more than the
higher of the broker's and its own storage's last generation, and writes it back before it
connects; a missing or unverifiable retained status never lowers it.

Limit: a node without storage (neither `storage.endpoint` nor `storage.results_dir`) has only
the broker's copy; it says so in a log line at connect.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from flame.clients.object_store import AnalysisLayout, ObjectNotFound, StorageError

if TYPE_CHECKING:
    from flame.clients.object_store import ObjectStore
    from flame.config import FlameConfig

__all__ = ["GenerationStore", "open_generation_store"]

log = logging.getLogger(__name__)

_TAG = "generation"


class GenerationStore:
    """The last generation of `node_id`'s processes for one analysis, in its own storage."""

    def __init__(self, store: ObjectStore, analysis_id: str, node_id: str) -> None:
        self.store = store
        self.key = AnalysisLayout(analysis_id).node_runtime_state(node_id, _TAG)

    def load(self) -> int:
        """The last generation written (0: none, or unreadable, with a warning)."""
        try:
            value = json.loads(self.store.get_bytes(self.key)).get("generation")
        except ObjectNotFound:
            return 0
        except (StorageError, ValueError, AttributeError, RecursionError) as exc:
            log.warning("cannot read this node's process generation (%s): using 0", exc)
            return 0
        return value if type(value) is int and value >= 0 else 0

    def save(self, generation: int) -> None:
        try:
            self.store.put_bytes(self.key, json.dumps({"generation": generation}).encode())
        except StorageError as exc:
            log.warning("cannot keep this node's process generation %d: %s", generation, exc)


def open_generation_store(config: FlameConfig, node_id: str) -> GenerationStore | None:
    """The node's generation store on its configured storage; None without storage."""
    storage = config.storage
    if storage.endpoint is None and storage.results_dir is None:
        return None
    from flame.clients.minio_client import open_store

    store = open_store(storage)
    if store is None:
        return None
    store.ensure_bucket()
    return GenerationStore(store, config.analysis_id, node_id)

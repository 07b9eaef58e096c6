"""Where `flame report` gets a run from: a `flame simulate --output` file, or storage.

From storage (by analysis id) the document is rebuilt from the manifest, the final result
and the epoch aggregates; a run without a final result yet shows up to its last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flame.errors import FlameError

if TYPE_CHECKING:
    from flame.aggregator.stored_reads import RunReads

__all__ = ["load_run"]


def load_run(source: str | Path, *, config: Any = None) -> dict[str, Any]:
    """The run document: a `flame simulate --output` JSON file, or an analysis id read
    from storage (FLAME_STORAGE__*, or `config`)."""
    path = Path(source)
    if path.is_file():
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FlameError(f"{path}: not a readable run result ({exc})") from None
        if not isinstance(document, dict) or not isinstance(document.get("history"), list):
            raise FlameError(
                f"{path}: not a run result (expected the JSON of `flame simulate --output`, "
                "with a 'history' list)"
            )
        return document
    if path.suffix.lower() == ".json" or "/" in str(source):
        raise FlameError(f"{source}: no such file")
    return _from_storage(str(source), config)


def _from_storage(analysis_id: str, config: Any) -> dict[str, Any]:
    """The run as storage keeps it, read through the same checks as `flame.load_result`
    (`RunReads`): with FLAME_ROSTER only records the aggregator signed, of one run, and only
    bytes they name."""
    from flame.aggregator.records import numeric_summary
    from flame.clients.object_store import AnalysisLayout, ObjectNotFound
    from flame.config import load_config
    from flame.wire.envelope import to_jsonable

    config = config if config is not None else load_config()
    if config.storage.endpoint is None and config.storage.results_dir is None:
        raise FlameError(
            f"{analysis_id!r} is not a file, and no storage is configured to read it from "
            "(FLAME_STORAGE__ENDPOINT or FLAME_STORAGE__RESULTS_DIR)"
        )
    from flame.clients.minio_client import open_store

    store = open_store(config.storage)
    assert store is not None
    reads = _reads(store, AnalysisLayout(analysis_id), config)
    try:
        manifest, newest = reads.manifest()
    except ObjectNotFound:
        return _unfinished(reads, analysis_id)
    try:
        value = reads.final_value(manifest)
    except ObjectNotFound:
        raise FlameError(f"analysis {analysis_id!r}: its final result is missing") from None
    history = [dict(item) for item in manifest.get("history", [])]
    for item in history:  # runs before per-epoch summaries: read the stored aggregates
        if "summary" in item:
            continue
        epoch = int(item["epoch"])
        if item is history[-1]:
            item["summary"] = numeric_summary(value)
            continue
        try:
            aggregate = reads.epoch_value(epoch, reads.checkpoint(epoch, newest))
        except ObjectNotFound:
            continue
        item["summary"] = numeric_summary(aggregate)
    extra = {k: v for k, v in manifest.items() if k not in ("history", "result", "sig")}
    return {
        "analysis_id": manifest.get("analysis_id", analysis_id),
        "result": to_jsonable(value),
        "converged": manifest.get("converged"),
        "epochs": manifest.get("epochs", len(history)),
        "history": history,
        "location": (manifest.get("result") or {}).get("key"),
        "manifest": extra,
    }


def _reads(store: Any, layout: Any, config: Any) -> RunReads:
    """The run's records as the aggregator would act on them (signed, with a roster)."""
    from flame.aggregator.stored_reads import RunReads

    roster = None
    if config.roster is not None:
        from flame.identity import Roster

        roster = Roster.load(config.roster)
    return RunReads(store, layout, roster=roster, aggregator_id=config.aggregator_id)


def _unfinished(reads: RunReads, analysis_id: str) -> dict[str, Any]:
    """A run without a final result (running, failed, stopped): its last checkpoint."""
    from flame.clients.object_store import ObjectNotFound
    from flame.wire.envelope import to_jsonable

    newest = reads.newest()
    meta, epoch = newest.record, newest.epoch
    if meta is None:
        raise FlameError(
            f"analysis {analysis_id!r} has neither a final result nor a checkpoint in storage "
            "(wrong analysis id, or a different FLAME_STORAGE__PREFIX?)"
        )
    try:
        value = reads.epoch_value(epoch, meta)
    except ObjectNotFound:
        value = None
    return {
        "analysis_id": analysis_id,
        "result": to_jsonable(value),
        "converged": False,
        "epochs": len(meta.get("history", [])),
        "history": list(meta.get("history", [])),
        "location": None,
        "manifest": {"code_sha256": meta.get("code_sha256")},
        "unfinished": f"no final result yet; the last checkpoint is after epoch {epoch}",
    }

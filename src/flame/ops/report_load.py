"""Where `flame report` gets a run from: a `flame simulate --output` file, or storage.

From storage (by analysis id) the document is rebuilt from the manifest, the final result
and the epoch aggregates; a run without a final result yet shows up to its last checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flame.errors import FlameError

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
    """The run as storage keeps it, read through the same checks as `flame.load_result`:
    with FLAME_ROSTER only records the aggregator signed, and only bytes they name."""
    from flame.aggregator.records import numeric_summary
    from flame.aggregator.stored_reads import check_final_run, epoch_value, final_value
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
    layout = AnalysisLayout(analysis_id)
    read = _reader(store, layout, config)
    try:
        manifest = read(layout.manifest())
    except ObjectNotFound:
        return _unfinished(store, layout, analysis_id, config.aggregator_id, read)
    newest = layout.latest_checkpoint(store)
    try:
        check_final_run(
            layout, manifest, None if newest is None else read(layout.checkpoint(newest))
        )
        value = final_value(store, layout, manifest)
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
            meta = read(layout.checkpoint(epoch))
            aggregate = epoch_value(store, layout, config.aggregator_id, epoch, meta)
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


def _reader(store: Any, layout: Any, config: Any) -> Callable[[str], dict[str, Any]]:
    """Reads a record as the aggregator would act on it (signed, with a roster)."""
    from flame.aggregator.stored_reads import verified_record

    roster = None
    if config.roster is not None:
        from flame.identity import Roster

        roster = Roster.load(config.roster)

    def read(key: str) -> dict[str, Any]:
        return verified_record(
            store, layout, key, roster=roster, aggregator_id=config.aggregator_id
        )

    return read


def _unfinished(
    store: Any, layout: Any, analysis_id: str, aggregator_id: str, read: Callable[[str], Any]
) -> dict[str, Any]:
    """A run without a final result (running, failed, stopped): its last checkpoint."""
    from flame.aggregator.stored_reads import epoch_value
    from flame.clients.object_store import ObjectNotFound
    from flame.wire.envelope import to_jsonable

    epoch = layout.latest_checkpoint(store)
    if epoch is None:
        raise FlameError(
            f"analysis {analysis_id!r} has neither a final result nor a checkpoint in storage "
            "(wrong analysis id, or a different FLAME_STORAGE__PREFIX?)"
        )
    meta = read(layout.checkpoint(epoch))
    try:
        value = epoch_value(store, layout, aggregator_id, epoch, meta)
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

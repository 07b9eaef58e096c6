"""Where `flame report` gets a run from: a `flame simulate --output` file, or storage.

From storage (by analysis id) the document is rebuilt from the manifest, the final result
and the epoch aggregates; a run without a final result yet shows up to its last checkpoint.
"""

from __future__ import annotations

import json
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
    from flame.aggregator.records import numeric_summary
    from flame.clients.object_store import AnalysisLayout, ObjectNotFound
    from flame.config import load_config
    from flame.wire.envelope import to_jsonable, unpack

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
    try:
        manifest = store.get_json(layout.manifest())
        value = unpack(store.get_bytes(layout.final_result()))
    except ObjectNotFound:
        return _unfinished(store, layout, analysis_id, config.aggregator_id)
    history = [dict(item) for item in manifest.get("history", [])]
    for item in history:  # runs before per-epoch summaries: read the stored aggregates
        if "summary" in item:
            continue
        epoch = int(item["epoch"])
        if item is history[-1]:
            item["summary"] = numeric_summary(value)
            continue
        try:
            aggregate = unpack(store.get_bytes(layout.epoch_result(epoch, config.aggregator_id)))
        except ObjectNotFound:
            continue
        item["summary"] = numeric_summary(aggregate)
    extra = {k: v for k, v in manifest.items() if k not in ("history", "result")}
    return {
        "analysis_id": manifest.get("analysis_id", analysis_id),
        "result": to_jsonable(value),
        "converged": manifest.get("converged"),
        "epochs": manifest.get("epochs", len(history)),
        "history": history,
        "location": (manifest.get("result") or {}).get("key"),
        "manifest": extra,
    }


def _unfinished(store: Any, layout: Any, analysis_id: str, aggregator_id: str) -> dict[str, Any]:
    """A run without a final result (running, failed, stopped): its last checkpoint."""
    from flame.clients.object_store import ObjectNotFound
    from flame.wire.envelope import to_jsonable, unpack

    epoch = layout.latest_checkpoint(store)
    if epoch is None:
        raise FlameError(
            f"analysis {analysis_id!r} has neither a final result nor a checkpoint in storage "
            "(wrong analysis id, or a different FLAME_STORAGE__PREFIX?)"
        )
    meta = store.get_json(layout.checkpoint(epoch))
    try:
        value = unpack(store.get_bytes(layout.epoch_result(epoch, aggregator_id)))
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

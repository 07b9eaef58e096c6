"""The JSON a simulated run leaves behind (`flame simulate --output`, `flame.simulate(output=)`).

One writer for both, so the CLI and Python produce the same document, and `flame report`
reads either. A failed run's document keeps the epochs that finished, the epoch it failed
in (`"failed_epoch"`: who answered, what they spent), the participants and `"failure"`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from flame.aggregator.records import EpochRecord, RunResult

__all__ = ["failure_document", "manifest", "run_document", "strict_json", "write_document"]


def strict_json(value: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers and strict parsers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return value


def manifest(
    functions: Any, result: RunResult, participants: list[str] | None = None
) -> dict[str, Any]:
    """What produced a simulated result (as a stored run's manifest.json says it)."""
    from flame import __version__
    from flame.aggregator.run_store import code_hash

    nodes = {n for record in result.history for n in (*record.nodes, *record.missing)}
    try:
        code: str | None = code_hash(functions)
    except OSError:  # functions typed into a notebook cell have no source file
        code = None
    return {
        "flame_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_sha256": code,
        "participants": sorted(nodes | set(participants or ())),
        "has_converged": getattr(functions, "converged", None) is not None,
    }


def run_document(
    result: RunResult, functions: Any, participants: list[str] | None = None
) -> dict[str, Any]:
    """A finished run as strict JSON data."""
    document: dict[str, Any] = strict_json(
        {**result.to_dict(), "manifest": manifest(functions, result, participants)}
    )
    return document


def failure_document(
    exc: BaseException,
    analysis_id: str,
    history: list[EpochRecord],
    functions: Any,
    participants: list[str] | None = None,
    unfinished: EpochRecord | None = None,
) -> dict[str, Any]:
    """A failed run: the epochs that finished, the one it failed in, and who failed where."""
    partial = RunResult(analysis_id, None, False, len(history), list(history))
    failure = {
        "node": getattr(exc, "node", None),
        "epoch": getattr(exc, "epoch", None)
        if getattr(exc, "epoch", None) is not None
        else (unfinished.epoch if unfinished is not None else None),
        "reason": str(exc),
    }
    document = {**run_document(partial, functions, participants), "failure": failure}
    if unfinished is not None and all(r.epoch != unfinished.epoch for r in history):
        # who answered the epoch the run failed in (and what they spent): not in `history`,
        # which holds the epochs that finished
        document["failed_epoch"] = strict_json(unfinished.to_dict())
    return document


def write_document(path: Path, document: dict[str, Any]) -> None:
    """Write the document; a missing folder is a clear error, not a traceback."""
    from flame.errors import FlameError

    if not path.parent.is_dir():
        raise FlameError(f"output {path}: folder {path.parent} does not exist")
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")

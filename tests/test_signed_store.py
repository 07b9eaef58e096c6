"""The aggregator's run-store records are signed and checked (red team B4): a planted or
altered manifest/checkpoint, a missing code hash or replaced result bytes are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from flame.aggregator.records import Checkpoint, RunResult
from flame.aggregator.run_store import StorageRunStore
from flame.clients.file_store import FileStore
from flame.clients.object_store import AnalysisLayout
from flame.errors import ConfigError
from flame.identity import Authenticator, Identity, Roster
from flame.wire.envelope import pack


def _auth() -> tuple[Authenticator, Identity]:
    aggregator, node = Identity.generate("agg"), Identity.generate("node-1")
    roster = Roster.of({"agg": ("aggregation", aggregator), "node-1": ("analysis", node)})
    return Authenticator(aggregator, roster), node


def _store(tmp_path: Path, auth: Authenticator | None, code: str = "c" * 64) -> StorageRunStore:
    return StorageRunStore(
        FileStore(tmp_path / "store"), "an-1", "agg", provenance={"code_sha256": code}, auth=auth
    )


def test_signed_final_and_checkpoint_read_back(tmp_path: Path) -> None:
    auth, _ = _auth()
    store = _store(tmp_path, auth)
    store.save_checkpoint(Checkpoint(1, {"x": 1.0}, []))
    assert store.load_checkpoint() == Checkpoint(1, {"x": 1.0}, [])
    store.save_final(RunResult("an-1", {"total": 36.0}, True, 1, [], ""))
    final = store.load_final()
    assert final is not None and final.value == {"total": 36.0}


def test_a_planted_manifest_is_refused(tmp_path: Path) -> None:
    auth, _ = _auth()
    layout = AnalysisLayout("an-1")
    raw = FileStore(tmp_path / "store")
    raw.ensure_bucket()
    stored = raw.put_bytes(layout.final_result(), pack({"total": 999.0}))
    manifest = {
        "converged": True,
        "epochs": 1,
        "history": [],
        "code_sha256": "c" * 64,
        "result": {"key": stored.key, "sha256": stored.sha256},
    }
    raw.put_json(layout.manifest(), manifest)
    with pytest.raises(ConfigError, match="not signed by the aggregator"):
        _store(tmp_path, auth).load_final()


def test_replaced_result_bytes_and_a_missing_code_hash_are_refused(tmp_path: Path) -> None:
    auth, _ = _auth()
    store = _store(tmp_path, auth)
    store.save_final(RunResult("an-1", {"total": 36.0}, True, 1, [], ""))
    store.store.put_bytes(AnalysisLayout("an-1").final_result(), pack({"total": 999.0}))
    with pytest.raises(ConfigError, match="SHA-256"):
        store.load_final()
    unsigned = _store(tmp_path / "u", None, code="")
    unsigned.save_final(RunResult("an-1", {"total": 1.0}, True, 1, [], ""))
    with pytest.raises(ConfigError, match="unnamed analysis code"):
        _store(tmp_path / "u", None).load_final()


def test_a_shared_store_keeps_no_logs_or_failure_details(tmp_path: Path) -> None:
    store = StorageRunStore(FileStore(tmp_path / "s"), "an-1", "agg", shared=True)
    store.save_logs(["node-0: patient 4711"])
    assert store.save_failure({"reason": "patient 4711"}) is None
    assert store.store.list("") == []

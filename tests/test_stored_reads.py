"""The shared stored-run reader (`flame.aggregator.stored_reads.RunReads`): genuine run shapes
read back; a gap, a stripped record, a final with too few checkpoints, and non-canonical epoch
keys are refused or ignored the same way for every reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from flame.aggregator.records import Checkpoint, RunResult
from flame.aggregator.run_store import StorageRunStore
from flame.aggregator.signed_store import sign_record
from flame.aggregator.stored_reads import RunReads, newest_verified_run
from flame.clients.file_store import FileStore
from flame.clients.object_store import AnalysisLayout
from flame.errors import ConfigError
from flame.identity import Authenticator, Identity, Roster

LAYOUT = AnalysisLayout("an-1")


@pytest.fixture
def run(tmp_path: Path) -> tuple[StorageRunStore, RunReads, Authenticator]:
    aggregator = Identity.generate("agg")
    roster = Roster.of({"agg": ("aggregation", aggregator)})
    auth = Authenticator(aggregator, roster)
    raw = FileStore(tmp_path / "store")
    store = StorageRunStore(raw, "an-1", "agg", provenance={"code_sha256": "c" * 64}, auth=auth)
    return store, RunReads(raw, LAYOUT, roster=roster, aggregator_id="agg"), auth


def _checkpoints(store: StorageRunStore, count: int) -> None:
    for epoch in range(count):
        store.save_checkpoint(Checkpoint(epoch + 1, {"x": float(epoch)}, []))


def test_a_server_shaped_run_reads_back(
    run: tuple[StorageRunStore, RunReads, Authenticator],
) -> None:
    """The aggregator checkpoints every epoch but the last: 10 epochs, checkpoints 0..8."""
    store, reads, _ = run
    _checkpoints(store, 9)
    store.save_final(RunResult("an-1", {"x": 9.0}, True, 10, [], ""))
    manifest, newest = reads.manifest()
    assert (newest.epoch, reads.final_value(manifest)) == (8, {"x": 9.0})
    assert reads.epoch_value(3, reads.checkpoint(3, newest)) == {"x": 3.0}


def test_a_final_too_far_after_the_newest_checkpoint_is_refused(
    run: tuple[StorageRunStore, RunReads, Authenticator],
) -> None:
    store, _, _ = run
    _checkpoints(store, 2)
    store.save_final(RunResult("an-1", {"x": 9.0}, True, 10, [], ""))
    with pytest.raises(ConfigError, match="names 10 epochs"):
        store.load_final()


def test_with_a_roster_a_final_of_two_epochs_needs_a_checkpoint(
    run: tuple[StorageRunStore, RunReads, Authenticator],
) -> None:
    store, reads, _ = run
    store.save_final(RunResult("an-1", {"x": 1.0}, True, 1, [], ""))
    assert reads.final_value(reads.manifest()[0]) == {"x": 1.0}  # one epoch: never checkpointed
    store.save_final(RunResult("an-1", {"x": 2.0}, True, 2, [], ""))
    with pytest.raises(ConfigError, match="names 2 epochs"):
        reads.manifest()


def test_a_gap_in_the_checkpoints_is_refused(
    run: tuple[StorageRunStore, RunReads, Authenticator],
) -> None:
    store, reads, _ = run
    _checkpoints(store, 3)
    reads.store.delete(LAYOUT.checkpoint(1))
    with pytest.raises(ConfigError, match="gaps"):
        newest_verified_run(reads.store, LAYOUT, roster=reads.roster, aggregator_id="agg")
    with pytest.raises(ConfigError, match="gaps"):
        store.load_checkpoint()


def test_with_a_roster_a_signed_checkpoint_without_run_or_size_is_refused(
    run: tuple[StorageRunStore, RunReads, Authenticator],
) -> None:
    """An old-format record (no run id, no size) is not read unchecked with a roster."""
    store, reads, auth = run
    _checkpoints(store, 1)
    key = LAYOUT.checkpoint(0)
    old = {k: v for k, v in reads.store.get_json(key).items() if k not in ("run", "sig")}
    reads.store.put_json(key, sign_record(auth.identity, "an-1", key, old))
    with pytest.raises(ConfigError, match="names no run or no size"):
        store.load_checkpoint()


def test_only_canonical_epoch_keys_are_checkpoints(tmp_path: Path) -> None:
    raw = FileStore(tmp_path / "store")
    raw.ensure_bucket()
    for name in ("000002", "99", "0000099", "00003a"):
        raw.put_json(f"an-1/epochs/{name}/checkpoint.json", {})
    assert LAYOUT.checkpointed_epochs(raw) == [2]

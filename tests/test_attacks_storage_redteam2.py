"""Red team 2: the verified stored-result reads (`flame.aggregator.stored_reads`) and the run
binding merged after red team 1.

Seats: (b) whoever can write the run's S3/MinIO bucket, (c) a roster member that is not the
aggregator. Against a real S3 server (moto). Claims attacked: docs/threat-model.md "Run store"
("a final only if it is of the run of the newest checkpoint", "flame status ... names it as a
problem", readers "check the same way"). A test that fails here is an attack that works today.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from servers.s3_server import S3Server

import flame
from flame.aggregator.records import Checkpoint, RunResult
from flame.aggregator.run_store import StorageRunStore
from flame.clients.minio_client import MinioStore
from flame.clients.object_store import AnalysisLayout
from flame.config import FlameConfig, StorageSettings, load_config
from flame.errors import ConfigError, FlameError
from flame.identity import Authenticator, Identity, Roster
from flame.ops.report_load import load_run
from flame.ops.status import StatusClient
from flame.ops.status_storage import failure_record

ANALYSIS = "study-7"
CODE = "c" * 64
LAYOUT = AnalysisLayout(ANALYSIS)
RUN_A = {"total": 111.25}  # the earlier run's final (10 epochs)
RUN_B = {"total": 7.5}  # the live re-run's aggregate


class Bucket:
    """A roster (aggregator, two nodes), the operator's config, and raw bucket access."""

    def __init__(self, tmp_path: Path, s3: S3Server, bucket: str) -> None:
        self.s3, self.bucket = s3, bucket
        self.aggregator = Identity.generate("aggregator")
        self.node = Identity.generate("node-1")
        self.roster = Roster.of(
            {
                "aggregator": ("aggregation", self.aggregator),
                "node-1": ("analysis", self.node),
                "node-2": ("analysis", Identity.generate("node-2")),
            }
        )
        self.roster_path = tmp_path / "roster.toml"
        self.roster.save(self.roster_path)
        self.store = MinioStore.from_settings(StorageSettings(**s3.settings(bucket=bucket)))
        self.store.ensure_bucket()
        self.raw = s3.client()

    def config(self) -> FlameConfig:
        return load_config(
            analysis_id=ANALYSIS,
            participants=["node-1", "node-2"],
            roster=self.roster_path,
            storage=self.s3.settings(bucket=self.bucket),
        )

    def run_store(self, identity: Identity | None = None) -> StorageRunStore:
        """A run's store, same code / participants / params / roster each time."""
        who = identity or self.aggregator
        return StorageRunStore(
            self.store,
            ANALYSIS,
            who.node_id,
            provenance={
                "code_sha256": CODE,
                "participants": ["node-1", "node-2"],
                "params": {},
                "roster_sha256": self.roster.fingerprint,
            },
            auth=Authenticator(who, self.roster),
        )

    def plant(self, key: str, data: bytes) -> None:
        self.raw.put_object(
            self.bucket, key, io.BytesIO(data), len(data),
            metadata={"flame-sha256": hashlib.sha256(data).hexdigest()},
        )  # fmt: skip

    def snapshot(self) -> dict[str, bytes]:
        return {k: self.raw.get_object(self.bucket, k).read() for k in self.store.list(LAYOUT.root)}

    def wipe(self) -> None:
        for key in self.store.list(LAYOUT.root):
            self.store.delete(key)


@pytest.fixture
def bucket(tmp_path: Path, s3_server: S3Server, s3_bucket: str) -> Bucket:
    return Bucket(tmp_path, s3_server, s3_bucket)


def run_a_then_rerun_b(b: Bucket) -> dict[str, bytes]:
    """Run A: 10 epochs and its signed final. The operator removes study-7/ (as flame's
    error message advises) and starts run B (same code, participants, params, roster), now
    after epoch 1. Returns run A's objects, as the bucket writer copied them."""
    a = b.run_store()
    for epoch in range(10):
        a.save_checkpoint(Checkpoint(epoch + 1, {"total": float(epoch)}, []))
    a.save_final(RunResult(ANALYSIS, RUN_A, True, 10, [], ""))
    saved = b.snapshot()
    b.wipe()
    rerun = b.run_store()
    rerun.save_checkpoint(Checkpoint(1, {"total": 1.0}, []))
    rerun.save_checkpoint(Checkpoint(2, RUN_B, []))
    return saved


# --- works today (failing tests) -------------------------------------------------------------


def test_resume_does_not_announce_an_earlier_runs_final_put_back_beside_a_rerun(
    bucket: Bucket,
) -> None:
    """(b) run A's signed manifest and result.bin put back beside run B's checkpoints.
    `flame.load_result` refuses (check_final_run), but a restarted aggregator of run B calls
    `load_final`, which never checks the run: it announces run A's result as run B's end."""
    saved = run_a_then_rerun_b(bucket)
    for key in (LAYOUT.manifest(), LAYOUT.final_result()):
        bucket.plant(key, saved[key])
    with pytest.raises(ConfigError, match="another run"):
        flame.load_result(ANALYSIS, config=bucket.config())
    resumed = bucket.run_store()
    with pytest.raises(ConfigError, match="another run"):
        resumed.load_final()  # today: returns run A's RunResult, announced as finished


def test_an_earlier_runs_newest_checkpoint_put_back_makes_its_final_count(
    bucket: Bucket,
) -> None:
    """(b) run A's final plus only its epoch-9 signed checkpoint put back beside run B's
    epochs 0-1: the listing's newest checkpoint is now run A's, so every reader takes run
    A's final as the end of run B (the checkpoints visibly mix two runs)."""
    saved = run_a_then_rerun_b(bucket)
    for key in (LAYOUT.manifest(), LAYOUT.final_result(), LAYOUT.checkpoint(9)):
        bucket.plant(key, saved[key])
    bucket.plant(LAYOUT.epoch_result(9, "aggregator"), saved[LAYOUT.epoch_result(9, "aggregator")])
    taken = []
    for name, read in (
        ("load_result", lambda: flame.load_result(ANALYSIS, config=bucket.config())),
        ("flame report", lambda: load_run(ANALYSIS, config=bucket.config())["result"]),
        ("resume load_final", lambda: bucket.run_store().load_final()),
        ("resume load_checkpoint", lambda: bucket.run_store().load_checkpoint()),
    ):
        try:
            read()
            taken.append(name)
        except FlameError:
            pass
    status = StatusClient(bucket.config()).status(ANALYSIS)
    if status.final is not None:
        taken.append("flame status")
    assert not taken, f"run A's records taken as run B's by {taken}"


def test_a_non_canonical_epoch_key_switches_off_the_run_check_in_flame_status(
    bucket: Bucket,
) -> None:
    """(b) as in red team 1's replay (run A's final beside run B), plus an empty object at
    `study-7/epochs/0000099/checkpoint.json`: `checkpointed_epochs` reads it as epoch 99,
    `layout.checkpoint(99)` is `.../000099/...`, not found, and `of_this_run` then skips the
    run check: `flame status` calls the running re-run finished with run A's result."""
    saved = run_a_then_rerun_b(bucket)
    for key in (LAYOUT.manifest(), LAYOUT.final_result()):
        bucket.plant(key, saved[key])
    bucket.plant(f"{LAYOUT.root}epochs/0000099/checkpoint.json", b"")
    status = StatusClient(bucket.config()).status(ANALYSIS)
    assert status.final is None, "flame status shows run A's final as run B's"


def test_a_non_canonical_epoch_key_does_not_hide_a_genuine_final(bucket: Bucket) -> None:
    """(b) a genuine finished run, plus an object at `epochs/99/checkpoint.json` (not the
    `%06d` form the aggregator writes): load_result says "no stored final result" and flame
    report "its final result is missing", while flame status shows the final. One bucket,
    three verdicts; the planted key should simply not be a checkpoint."""
    store = bucket.run_store()
    store.save_checkpoint(Checkpoint(1, {"total": 1.0}, []))
    store.save_final(RunResult(ANALYSIS, RUN_B, True, 1, [], ""))
    bucket.plant(f"{LAYOUT.root}epochs/99/checkpoint.json", b"{}")
    assert StatusClient(bucket.config()).status(ANALYSIS).final is not None
    assert flame.load_result(ANALYSIS, config=bucket.config()) == RUN_B


def test_a_later_sorting_unsigned_failure_record_hides_the_signed_one(bucket: Bucket) -> None:
    """(b) the aggregator kept a signed failure record; the writer adds an unsigned
    `failures/99991231T235959Z.json`. `failure_record` reads only the last key, finds it
    unsigned and shows nothing: the genuine reason is hidden from `flame status`."""
    store = bucket.run_store()
    store.save_failure({"reason": "genuine-cause-ZQX", "node": "node-2", "epoch": 3})
    bucket.plant(f"{LAYOUT.root}failures/99991231T235959Z.json", b'{"reason":"x"}')
    shown = failure_record(bucket.store, ANALYSIS, bucket.config())
    assert shown is not None and shown.get("reason") == "genuine-cause-ZQX"


def test_flame_status_does_not_show_an_earlier_runs_failure_as_the_reruns(
    bucket: Bucket,
) -> None:
    """(b) run A failed (signed record) and was removed; run B runs. Run A's failure record
    put back: `failure_record` does not compare its run with the newest checkpoint's."""
    a = bucket.run_store()
    a.save_checkpoint(Checkpoint(1, {"total": 1.0}, []))
    a.save_failure({"reason": "run-a-cause-ZQX", "node": "node-1", "epoch": 1})
    saved = bucket.snapshot()
    bucket.wipe()
    bucket.run_store().save_checkpoint(Checkpoint(1, RUN_B, []))
    for key, data in saved.items():
        if "/failures/" in key:
            bucket.plant(key, data)
    shown = failure_record(bucket.store, ANALYSIS, bucket.config())
    assert shown is None or shown.get("reason") != "run-a-cause-ZQX"


# --- refused (passing tests) -----------------------------------------------------------------


def test_a_final_signed_by_a_non_aggregator_roster_member_is_refused(bucket: Bucket) -> None:
    """(c) node-1 (roster member, holds the bucket credentials under the claim check) writes
    a complete run store signed with its own key: every reader refuses it."""
    forged = bucket.run_store(identity=bucket.node)
    forged.save_checkpoint(Checkpoint(1, RUN_A, []))
    forged.save_final(RunResult(ANALYSIS, RUN_A, True, 1, [], ""))
    with pytest.raises(ConfigError, match="not signed by the aggregator"):
        flame.load_result(ANALYSIS, config=bucket.config())
    with pytest.raises(ConfigError, match="not signed by the aggregator"):
        load_run(ANALYSIS, config=bucket.config())
    with pytest.raises(ConfigError, match="not signed by the aggregator"):
        bucket.run_store().load_final()
    assert StatusClient(bucket.config()).status(ANALYSIS).final is None


def test_a_signed_record_stripped_of_its_run_and_size_is_refused(bucket: Bucket) -> None:
    """(b) downgrade: the manifest rewritten without `run` and `result.size` (an old-format
    record) keeps its signature only if re-signed, which the writer cannot do."""
    store = bucket.run_store()
    store.save_checkpoint(Checkpoint(1, {"total": 1.0}, []))
    store.save_final(RunResult(ANALYSIS, RUN_B, True, 1, [], ""))
    manifest = json.loads(bucket.raw.get_object(bucket.bucket, LAYOUT.manifest()).read())
    manifest.pop("run")
    manifest["result"].pop("size")
    bucket.plant(LAYOUT.manifest(), json.dumps(manifest).encode())
    with pytest.raises(ConfigError, match="not signed by the aggregator"):
        flame.load_result(ANALYSIS, config=bucket.config())
    with pytest.raises(ConfigError, match="not signed by the aggregator"):
        store.load_final()


def test_a_failure_record_renamed_to_sort_last_is_refused(bucket: Bucket) -> None:
    """(b) a genuine signed failure record moved to a later-sorting name: the signature
    binds the key, so the copy is not shown. (Moved, not copied: since failure_record walks
    newest-first to the first verified record, a left original would rightly be shown.)"""
    store = bucket.run_store()
    key = store.save_failure({"reason": "old-cause-ZQX", "node": "node-1", "epoch": 0})
    assert key is not None
    data = bucket.raw.get_object(bucket.bucket, key).read()
    bucket.plant(f"{LAYOUT.root}failures/99991231T235959Z.json", data)
    bucket.store.delete(key)
    shown = failure_record(bucket.store, ANALYSIS, bucket.config())
    assert shown is None  # the renamed copy is not taken as signed

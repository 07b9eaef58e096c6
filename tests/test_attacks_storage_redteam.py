"""Red team: the run's results in shared storage, and what reads them back.

Seats: (b) whoever holds the shared store's credentials (every node does under
`FLAME_STORAGE__CLAIM_CHECK`), (a) the broker operator, (c) a roster aggregator holding its
own key. Against a real S3 server (moto) and, for the claim check, a real broker. Claims
attacked: docs/threat-model.md "Run store" ("`flame status` and `flame.load_result` check the
same way when `FLAME_ROSTER` is set"), "Chunked and claim-checked payloads", and
docs/faults.md "runs never mix". A test that fails here is an attack that works today.
"""

from __future__ import annotations

import hashlib
import io
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, have_mosquitto
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
from flame.transport.claim_check import StorageClaimCheck
from flame.transport.mqtt import MqttTransport
from flame.wire.envelope import Envelope, pack

ANALYSIS = "study-7"
CODE = "c" * 64
GENUINE = {"total": 36.0}
FORGED = {"total": 999999.0}


class Federation:
    """A roster (aggregator + two nodes + a second study's aggregator), the operator's
    config and the aggregator's signed run store on the moto bucket."""

    def __init__(self, tmp_path: Path, s3: S3Server, bucket: str) -> None:
        self.s3, self.bucket = s3, bucket
        self.aggregator = Identity.generate("aggregator")
        self.other_aggregator = Identity.generate("agg-8")  # seat (c): another study's
        nodes = {n: ("analysis", Identity.generate(n)) for n in ("node-1", "node-2")}
        self.roster = Roster.of(
            {
                "aggregator": ("aggregation", self.aggregator),
                "agg-8": ("aggregation", self.other_aggregator),
                **nodes,
            }
        )
        self.roster_path = tmp_path / "roster.toml"
        self.roster.save(self.roster_path)
        self.settings = StorageSettings(**s3.settings(bucket=bucket))
        self.store = MinioStore.from_settings(self.settings)
        self.store.ensure_bucket()
        self.raw = s3.client()

    def config(self, **update: Any) -> FlameConfig:
        return load_config(
            analysis_id=ANALYSIS,
            participants=["node-1", "node-2"],
            roster=self.roster_path,
            storage=self.s3.settings(bucket=self.bucket),
            **update,
        )

    def run_store(
        self, analysis: str = ANALYSIS, *, identity: Identity | None = None, **provenance: Any
    ) -> StorageRunStore:
        auth = Authenticator(identity or self.aggregator, self.roster)
        return StorageRunStore(
            self.store,
            analysis,
            "aggregator" if identity is None else identity.node_id,
            provenance={"code_sha256": CODE, **provenance},
            auth=auth,
        )

    def finish(self, analysis: str = ANALYSIS, value: Any = GENUINE, **provenance: Any) -> None:
        """A genuine run: a checkpoint after epoch 0 and the signed final result."""
        store = self.run_store(analysis, **provenance)
        store.save_checkpoint(Checkpoint(1, {"total": 10.0}, []))
        store.save_final(RunResult(analysis, value, True, 1, [], ""))

    def plant(self, key: str, data: bytes) -> None:
        """Seat (b): write raw bytes with a SHA-256 metadata that matches them, so the
        object store's own per-object check passes (the metadata is the writer's)."""
        self.raw.put_object(
            self.bucket,
            key,
            io.BytesIO(data),
            len(data),
            metadata={"flame-sha256": hashlib.sha256(data).hexdigest()},
        )

    def copy(self, source: str, target: str) -> None:
        self.plant(target, self.raw.get_object(self.bucket, source).read())


@pytest.fixture
def fed(tmp_path: Path, s3_server: S3Server, s3_bucket: str) -> Federation:
    return Federation(tmp_path, s3_server, s3_bucket)


LAYOUT = AnalysisLayout(ANALYSIS)


# --- refused: what the signed run store already stops ----------------------------------------


def test_load_result_refuses_bytes_swapped_under_a_signed_manifest(fed: Federation) -> None:
    """(b) result.bin replaced, its metadata SHA-256 consistent: the signed manifest's
    SHA-256 does not match, so `flame.load_result` refuses (and so does the aggregator)."""
    fed.finish()
    assert flame.load_result(ANALYSIS, config=fed.config()) == GENUINE
    fed.plant(LAYOUT.final_result(), pack(FORGED))
    with pytest.raises(ConfigError, match="SHA-256"):
        flame.load_result(ANALYSIS, config=fed.config())
    with pytest.raises(ConfigError, match="SHA-256"):
        fed.run_store().load_final()


def test_a_signed_checkpoint_moved_to_a_later_epoch_is_refused(fed: Federation) -> None:
    """(b) epoch 0's signed checkpoint and aggregate copied under epoch 5 (a roll-forward):
    the signature binds the storage key, so neither resume nor load_result takes it."""
    fed.finish()
    fed.copy(LAYOUT.checkpoint(0), LAYOUT.checkpoint(5))
    fed.copy(LAYOUT.epoch_result(0, "aggregator"), LAYOUT.epoch_result(5, "aggregator"))
    with pytest.raises(ConfigError, match="not signed by the aggregator"):
        flame.load_result(ANALYSIS, epoch=5, config=fed.config())
    with pytest.raises(ConfigError, match="not signed by the aggregator"):
        fed.run_store().load_checkpoint()


def test_another_analysis_signed_final_copied_in_is_refused(fed: Federation) -> None:
    """(b) study-6's genuine signed manifest + result copied under study-7 (same
    aggregator, same code): the signature binds the analysis id."""
    fed.finish("study-6", FORGED)
    other = AnalysisLayout("study-6")
    fed.copy(other.manifest(), LAYOUT.manifest())
    fed.copy(other.final_result(), LAYOUT.final_result())
    with pytest.raises(ConfigError, match="not signed by the aggregator"):
        flame.load_result(ANALYSIS, config=fed.config())
    with pytest.raises(ConfigError, match="not signed by the aggregator"):
        fed.run_store().load_final()
    assert StatusClient(fed.config()).final(ANALYSIS) is None


def test_a_final_signed_by_another_roster_aggregator_is_refused(fed: Federation) -> None:
    """(c) the aggregator of another study in the same roster signs a final for study-7
    with its own key (planted through the shared store): only the configured aggregator's
    signature counts, for load_result, `flame status` and the aggregator itself."""
    rogue = fed.run_store(identity=fed.other_aggregator)
    rogue.save_final(RunResult(ANALYSIS, FORGED, True, 1, [], ""))
    with pytest.raises(ConfigError, match="not signed by the aggregator 'aggregator'"):
        flame.load_result(ANALYSIS, config=fed.config())
    with pytest.raises(ConfigError, match="not signed by the aggregator"):
        fed.run_store().load_final()
    status = StatusClient(fed.config()).status(ANALYSIS)
    assert status.final is None and status.converged is None


def test_status_download_refuses_bytes_swapped_with_the_manifest_digest_as_metadata(
    fed: Federation, tmp_path: Path
) -> None:
    """(b) forged bytes whose metadata claims the signed manifest's SHA-256 (so `flame
    status` lists them as the final result): `--download` hashes the bytes and refuses."""
    fed.finish()
    genuine = fed.raw.stat_object(fed.bucket, LAYOUT.final_result()).metadata
    digest = genuine["x-amz-meta-flame-sha256"]
    forged = pack(FORGED)
    fed.raw.put_object(
        fed.bucket, LAYOUT.final_result(), io.BytesIO(forged), len(forged),
        metadata={"flame-sha256": digest},
    )  # fmt: skip
    target = tmp_path / "result.bin"
    with pytest.raises(FlameError, match="SHA-256"):
        StatusClient(fed.config()).download(ANALYSIS, target)
    assert not target.exists()


def test_a_claim_checked_frame_swapped_in_storage_is_dropped(
    fresh_broker: Broker, fed: Federation
) -> None:
    """(b) the claim-check object overwritten between the sender's write and the
    receiver's fetch (same size, other bytes; then the analysis's final result, which a
    reference may also name): the reference's SHA-256 drops it; nothing reaches the node."""
    fed.finish()
    settings = fresh_broker.settings(chunk_size=16 * 1024)

    swaps: list[str] = []

    class Swapping(StorageClaimCheck):
        swap: bytes | None = None  # None: leave the object alone (the control)

        def put(self, parts: Any, size: int, sha256: bytes) -> str:
            key = super().put(parts, size, sha256)
            if self.swap is not None:
                data = bytearray(fed.raw.get_object(fed.bucket, key).read())
                data[-1] ^= 0xFF  # same size, other bytes
                fed.plant(key, bytes(data) if self.swap == b"flip" else self.swap)
                swaps.append(key)
            return key

    check = Swapping(fed.store, ANALYSIS, "node-1")
    sender = MqttTransport(settings, ANALYSIS, "node-1", claim_check=check)
    receiver = MqttTransport(
        settings, ANALYSIS, "aggregator",
        claim_check=StorageClaimCheck(fed.store, ANALYSIS, "aggregator"),
    )  # fmt: skip
    receiver.connect({"state": "waiting"})
    sender.connect({"state": "waiting"})
    final = fed.raw.get_object(fed.bucket, LAYOUT.final_result()).read()

    def deliver(epoch: int) -> Envelope | None:
        body = {"update": list(range(20_000))}
        sender.send(Envelope(ANALYSIS, "node-1", "aggregator", "result", epoch, body))
        got = receiver.receive(timeout=4)
        while got is not None and got.kind == "status":
            got = receiver.receive(timeout=4)
        return got

    try:
        control = deliver(0)
        assert control is not None and control.kind == "result"  # unswapped: it arrives
        dropped = receiver.dropped
        check.swap = b"flip"
        assert deliver(1) is None
        check.swap = final
        assert deliver(2) is None
        assert len(swaps) == 2 and receiver.dropped >= dropped + 2
    finally:
        sender.close()
        receiver.close()


# --- works today: readers that skip the signed manifest ---------------------------------------


def test_report_refuses_result_bytes_swapped_under_a_signed_manifest(fed: Federation) -> None:
    """(b) `flame report ID` with FLAME_ROSTER set reads final/result.bin without checking
    it against the signed manifest: the forged total is rendered as the run's result."""
    fed.finish()
    fed.plant(LAYOUT.final_result(), pack(FORGED))
    try:
        document = load_run(ANALYSIS, config=fed.config())
    except FlameError:
        return  # refused: secure
    assert document["result"] != FORGED, "flame report presented a forged final result"


def test_flame_report_cli_exits_0_on_a_forged_final(
    fed: Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(b) the same through the CLI an operator runs: `flame report study-7` with
    FLAME_ROSTER set exits 0 and writes a page that states the forged total."""
    from flame.cli.app import main

    fed.finish()
    fed.plant(LAYOUT.final_result(), pack(FORGED))
    for name, value in fed.s3.settings(bucket=fed.bucket).items():
        monkeypatch.setenv(f"FLAME_STORAGE__{name.upper()}", str(value).lower()
                           if isinstance(value, bool) else str(value))  # fmt: skip
    monkeypatch.setenv("FLAME_ROSTER", str(fed.roster_path))
    out = tmp_path / "report.html"
    try:
        code = main(["report", ANALYSIS, "--out", str(out)])
    except (FlameError, SystemExit):
        return  # refused
    page = out.read_text(encoding="utf-8") if out.exists() else ""
    assert not (code == 0 and "999999" in page), "flame report exited 0 showing a forged final"


def test_report_refuses_a_planted_unsigned_final_before_the_run_ends(fed: Federation) -> None:
    """(b) while the run is still at epoch 0, a node with the claim-check credentials plants
    an unsigned manifest + result: `flame report` shows a finished, converged run."""
    store = fed.run_store()
    store.save_checkpoint(Checkpoint(1, {"total": 10.0}, []))
    fed.plant(LAYOUT.final_result(), pack(FORGED))
    planted = {"analysis_id": ANALYSIS, "epochs": 1, "converged": True, "history": []}
    fed.plant(LAYOUT.manifest(), flame_json(planted))
    try:
        document = load_run(ANALYSIS, config=fed.config())
    except FlameError:
        return
    assert document["result"] != FORGED and document.get("unfinished"), (
        "flame report presented an unsigned, planted final result of a running analysis"
    )


def test_report_of_a_running_analysis_refuses_a_planted_checkpoint(fed: Federation) -> None:
    """(b) no final yet: `flame report` shows the latest checkpoint; an unsigned one planted
    at epoch 7 with a forged aggregate is shown as the run's state."""
    store = fed.run_store()
    store.save_checkpoint(Checkpoint(1, {"total": 10.0}, []))
    fed.plant(LAYOUT.checkpoint(7), flame_json({"next_epoch": 8, "history": []}))
    fed.plant(LAYOUT.epoch_result(7, "aggregator"), pack(FORGED))
    try:
        document = load_run(ANALYSIS, config=fed.config())
    except FlameError:
        return
    assert document["result"] != FORGED, "flame report presented a planted checkpoint"


def test_status_result_refuses_bytes_swapped_under_a_signed_manifest(fed: Federation) -> None:
    """(b) `flame.ops.status.StatusClient.result(ID)` ("the final aggregate itself
    (verified...)") unpacks final/result.bin with only the writer's own metadata check."""
    fed.finish()
    fed.plant(LAYOUT.final_result(), pack(FORGED))
    try:
        value = StatusClient(fed.config()).result(ANALYSIS)
    except FlameError:
        return
    assert value != FORGED, "StatusClient.result returned a forged final result"


def test_a_replayed_final_of_another_participant_set_is_not_announced(
    fed: Federation,
) -> None:
    """(b) run 1 (node-1 only, threshold 1) finished, signed. The operator removes study-7/
    to run again with node-1 and node-2 and another parameter, same code; the store writer
    puts run 1's signed manifest and result back. `load_final` checks only the code hash,
    so the aggregator announces run 1's result to both nodes and every process exits 0."""
    fed.finish(participants=["node-1"], params={"threshold": 1})
    saved = {
        key: fed.raw.get_object(fed.bucket, key).read()
        for key in (LAYOUT.manifest(), LAYOUT.final_result())
    }
    for key in fed.store.list(LAYOUT.root):
        fed.store.delete(key)
    for key, data in saved.items():  # the replay
        fed.plant(key, data)
    second = fed.run_store(participants=["node-1", "node-2"], params={"threshold": 2})
    try:
        final = second.load_final()
    except ConfigError:
        return  # refused: secure
    assert final is None, "a final of another participant set / parameters was announced"


def test_a_checkpoint_of_other_parameters_is_not_resumed(fed: Federation) -> None:
    """(b)/(ops) the same for a resume: a signed checkpoint of a run with other
    participants and parameters is taken as this run's previous aggregate."""
    fed.run_store(participants=["node-1"], params={"threshold": 1}).save_checkpoint(
        Checkpoint(1, FORGED, [])
    )
    second = fed.run_store(participants=["node-1", "node-2"], params={"threshold": 2})
    try:
        checkpoint = second.load_checkpoint()
    except ConfigError:
        return
    assert checkpoint is None, "resumed from a checkpoint of other participants / parameters"


def test_a_huge_object_under_the_final_key_is_not_read_whole(fed: Federation) -> None:
    """(b) result.bin replaced by 48 MiB (metadata consistent): the signed manifest names
    the result's size, yet `load_result` reads the whole object into memory before its
    SHA-256 check (the claim check caps its reads at the declared size; this path not)."""
    fed.finish()
    big = b"\0" * (48 << 20)
    fed.plant(LAYOUT.final_result(), big)
    del big
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError):
            flame.load_result(ANALYSIS, config=fed.config())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"read {peak / 2**20:.0f} MiB for a result the manifest sizes at <1 KiB"


def flame_json(value: Any) -> bytes:
    import json

    return json.dumps(value).encode()


def test_a_deeply_nested_planted_manifest_does_not_crash_status_or_load_result(
    fed: Federation,
) -> None:
    """(b) one planted `final/manifest.json` of 200,000 nested lists (1 MB): json.loads
    raises RecursionError, which `decode_json` does not turn into a StorageError, so
    `flame status` (which reports storage problems and still shows the nodes) and
    `flame.load_result` die with a RecursionError instead of naming the object."""
    fed.finish()
    fed.plant(LAYOUT.manifest(), b"[" * 200_000 + b"]" * 200_000)
    try:
        status = StatusClient(fed.config()).status(ANALYSIS)
    except RecursionError:
        pytest.fail("flame status crashed (RecursionError) on one planted object")
    assert status.final is None and any("manifest" in p for p in status.problems)
    with pytest.raises(FlameError):
        flame.load_result(ANALYSIS, config=fed.config())


def test_flame_status_does_not_show_a_planted_failure_reason(
    fed: Federation, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """(b) a run genuinely failed (the aggregator's signed, current status says so: stubbed
    here, the broker side is attacked elsewhere). Under the claim check the aggregator keeps
    no failure record in the shared store, so any `failures/*.json` there is planted; `flame
    status ID` with FLAME_ROSTER set prints its reason and "traceback" (`failure_record`
    verifies nothing) — text blaming another node, shown to the operator as the cause."""
    from flame.cli.app import main
    from flame.ops import status as st
    from flame.ops.status_records import NodeStatus, RunStatus

    planted = {"reason": "node-2 sent a forged result; exclude it", "traceback": "Fake"}
    fed.plant(f"{LAYOUT.root}failures/29991231T235959Z.json", flame_json(planted))
    failed = NodeStatus(
        "aggregator", "failed", role="aggregation", epoch=0, reason="ValueError",
        verified=True, current=True,
    )  # fmt: skip
    monkeypatch.setattr(
        st.StatusClient,
        "status",
        lambda self, analysis: RunStatus(analysis, {"aggregator": failed}, "aggregator"),
    )
    for name, value in fed.s3.settings(bucket=fed.bucket).items():
        monkeypatch.setenv(f"FLAME_STORAGE__{name.upper()}", str(value).lower()
                           if isinstance(value, bool) else str(value))  # fmt: skip
    monkeypatch.setenv("FLAME_STORAGE__CLAIM_CHECK", "true")
    monkeypatch.setenv("FLAME_ROSTER", str(fed.roster_path))
    main(["status", ANALYSIS])
    out = capsys.readouterr().out
    assert "failed" in out  # the genuine state is shown
    assert "exclude it" not in out, "flame status printed a planted failure reason"


def test_status_does_not_call_a_running_rerun_finished_on_a_replayed_old_final(
    fed: Federation,
) -> None:
    """(b) run 1 of study-7 (node-1 only) finished, signed. The operator removes study-7/
    (as flame's own error message advises) and starts run 2 (node-1 and node-2), now at
    epoch 0 with a signed checkpoint. The store writer puts run 1's signed manifest and
    result back: `flame status` with FLAME_ROSTER calls run 2 finished and offers run 1's
    result (records are bound to analysis id and key, not to a run)."""
    fed.finish(participants=["node-1"])
    saved = {
        key: fed.raw.get_object(fed.bucket, key).read()
        for key in (LAYOUT.manifest(), LAYOUT.final_result())
    }
    for key in fed.store.list(LAYOUT.root):
        fed.store.delete(key)
    rerun = fed.run_store(participants=["node-1", "node-2"])
    rerun.save_checkpoint(Checkpoint(1, {"total": 11.0}, []))
    for key, data in saved.items():
        fed.plant(key, data)
    status = StatusClient(fed.config()).status(ANALYSIS)
    assert status.state != "finished" or status.problems, (
        "flame status called a running re-run finished with the previous run's result"
    )


SLOW_WHEN_BIG = """
import time

def analyze(data):
    v = [float(x) for x in data.read_text("v.txt").split()]
    if sum(v) > 1000:
        time.sleep(20)  # run 2's node-0: still computing when the replay lands
    return {"x": sum(v)}

def aggregate(results):
    return {"total": sum(r["x"] for r in results.values())}
"""


def test_a_node_takes_no_finished_of_an_earlier_run_of_the_same_code(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    """(a) run 1 of study X finishes ({"total": 36}); the operator records the aggregator's
    signed `finished` frames. Run 2 of X, same approved code, new data at node-0 (honest
    total 3030), is in epoch 0 (node-0 computing, in run 2 since its kick-off). The operator
    re-publishes run 1's `finished` to node-0. `read_instruction` checks only the code hash
    (`ends_this_run(None, ...)`) and `InstructionReader.admit` lets a `finished` of a run
    other than the node's current one through (only left runs are refused): would node-0 exit
    0 with run 1's result. Safe outcome: node-0 does not exit 0 with 36. (Refused: the
    node binds a `finished` to the aggregator process it runs under.)"""
    if not have_mosquitto():
        pytest.skip("needs the mosquitto binary")
    import time as clock

    from nodes import Federation as Processes
    from redteam_harness import run_of
    from test_attacks_protocol_redteam import Recorder
    from test_attacks_status import Spy

    from flame.identity.signing import verify_envelope

    analysis = f"rt-store-rerun-{clock.monotonic_ns()}"
    fed = run_of(
        mqtt_broker, tmp_path, analysis, SLOW_WHEN_BIG, {"node-0": "1 2 3", "node-1": "10 20"}
    )
    recorder = Recorder(mqtt_broker, analysis)
    try:
        fed.start_all()
        assert fed.finish(timeout=120)["node-0"] == {"total": 36.0}
    finally:
        fed.close()
    roster = Roster.load(Path(fed.env["FLAME_ROSTER"]))
    with recorder.lock:
        finished = []
        for topic, payload in recorder.frames:
            try:
                envelope = verify_envelope(payload, roster)
            except Exception:  # chunks, acks, statuses, references: not replayed here
                continue
            if envelope.kind == "finished" and envelope.recipient in ("node-0", "*"):
                finished.append((topic, payload))
        recorder.frames = finished
    assert finished, "run 1's finished was not recorded"
    (fed.data / "node-0" / "v.txt").write_text("1000 2000\n")
    second = Processes(fed.env, fed.analysis, fed.data, fed.nodes, tmp_path / "logs2")
    spy = Spy(mqtt_broker, analysis)
    try:
        second.start_all()
        deadline = clock.monotonic() + 60
        while clock.monotonic() < deadline:
            if any(s.get("state") == "computing" for s in spy.statuses("node-0")[-1:]):
                break
            clock.sleep(0.1)
        else:
            raise RuntimeError("precondition: node-0 never computed in run 2")
        clock.sleep(1.0)
        assert recorder.replay() >= 1
        node = second.processes["node-0"]
        try:
            code = node.wait(60)
        except AssertionError:
            code = None
        value = node.value() if code == 0 else None
    finally:
        spy.close()
        recorder.close()
        second.close()
    assert not (code == 0 and value == {"total": 36.0}), (
        f"node-0 exited {code} with run 1's result {value} during run 2"
    )
    log_text = (tmp_path / "logs2" / "node-0.0.err").read_text(encoding="utf-8")
    assert "ignored a finished" in log_text  # the replay reached node-0 and was refused
    assert code == 0 and value == {"total": 3030.0}

"""Real containers: flame's image built with podman, a federation of containers run from it.

Opt-in (FLAME_CONTAINER_TESTS=1), because it needs a container engine and a minute of build:
`.ci/run` installs podman and sets it when podman works, and says why it skipped otherwise.
test_container.py replays the same Dockerfile without an engine in every run.

The base image is the official python:3.11-slim when it can be pulled, else the stand-in of
docker/standin-base.sh (cached outside the repository). flame's image is built from a copy of
the repository with planted secrets (a .env, a key file) that must not reach it; the analysis
image from `flame init --example federated_mean` with a hash-pinned requirement its code
imports. Then one aggregator and three analysis containers run against a Mosquitto on the
host (--network=host): read-only data mounts, the broker token as a mounted file, results in
a mounted folder; the result must equal `flame simulate`'s. Stopping one container mid-run
must stop the others with its reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from podman import EngineUnusable, Podman, scan
from test_container import build_context

from flame import __version__
from flame.analysis.code_hash import analysis_code_hash
from flame.clients.object_store import AnalysisLayout
from flame.config import FlameConfig
from flame.ops.scaffold import IMAGE_LABEL
from flame.wire.envelope import unpack

pytestmark = pytest.mark.container

ENABLED = os.environ.get("FLAME_CONTAINER_TESTS") == "1"
# nodes authenticate with a roster and signing keys, and check code hashes, once flame has them
IDENTITIES = importlib.util.find_spec("flame.identity") is not None
APPROVAL = "approved_code" in FlameConfig.model_fields
FLAME_IMAGE = f"localhost/flame:{__version__}"
ANALYSIS_IMAGE = "localhost/flame-test-analysis:latest"
NODES = ("clinic_a", "clinic_b", "clinic_c")
UID = 10001
# a pure-Python package the analysis imports, pinned with the hash PyPI publishes for its wheel
REQUIREMENT = (
    "sortedcontainers==2.4.0 "
    "--hash=sha256:a163dcaede0f1c021485e957a39245190e74249897e2ae4b2aa38595db237ee0"
)
RUN_DEADLINE = 240.0


def report(request: pytest.FixtureRequest, text: str) -> None:
    """A line in the CI log, past pytest's capture."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"[container] {text}", flush=True)


@dataclass
class Built:
    podman: Podman
    base: str
    flame_seconds: float
    analysis_seconds: float
    folder: Path  # the `flame init` project the analysis image was built from
    code_sha256: str
    canaries: tuple[bytes, ...]


def _owned_by_runtime_user(path: Path, mode: int) -> Path:
    """Readable (and for folders writable) by the image's user 10001, as a mounted volume."""
    if os.geteuid() == 0:
        os.chown(path, UID, UID)
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    if not ENABLED:
        pytest.skip("real-container tests are opt-in: FLAME_CONTAINER_TESTS=1 (.ci/run sets it)")
    work = tmp_path_factory.mktemp("podman")
    try:
        podman = Podman.find(work)
    except EngineUnusable as exc:
        pytest.fail(f"FLAME_CONTAINER_TESTS=1 but {exc}")
    base, how = podman.base_image()
    for line in podman.log:
        report(request, line)
    report(request, f"base image {base} ({how})")
    probe = podman("run", "--rm", *podman.runtime, *podman.limits, base, "true", check=False)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[-300:]}")

    # flame's image, from a copy of the repository holding secrets that must stay out of it
    canaries = tuple(f"canary-{secrets.token_hex(12)}".encode() for _ in range(3))
    context = build_context(work / "context")
    (context / ".env").write_bytes(b"FLAME_BROKER__TOKEN=" + canaries[0] + b"\n")
    (context / "examples" / "node.key").write_bytes(canaries[1] + b"\n")
    seconds, done = podman.build(context, FLAME_IMAGE, {"PYTHON_IMAGE": base})
    assert done.returncode == 0, f"flame image build failed:\n{done.stdout[-4000:]}{done.stderr}"

    # the analysis image, from `flame init`, with a requirement and a secret of its own
    folder = work / "analysis"
    made = subprocess.run(
        [sys.executable, "-m", "flame", "init", str(folder), "--example", "federated_mean"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    with (folder / "requirements.txt").open("a") as requirements:
        requirements.write(REQUIREMENT + "\n")
    code = (folder / "analysis.py").read_text()
    (folder / "analysis.py").write_text(
        code.replace("import numpy as np\n", "import numpy as np\nimport sortedcontainers\n", 1)
    )
    (folder / ".env").write_bytes(b"TOKEN=" + canaries[2] + b"\n")
    digest = analysis_code_hash(folder)
    analysis_seconds, done = podman.build(
        folder, ANALYSIS_IMAGE, {"FLAME_IMAGE": FLAME_IMAGE, "FLAME_CODE_SHA256": digest}
    )
    assert done.returncode == 0, f"analysis image build failed:\n{done.stdout[-4000:]}{done.stderr}"
    report(request, f"flame image {FLAME_IMAGE}: built in {seconds:.1f} s, "
                    f"{podman.size(FLAME_IMAGE) / 1e6:.0f} MB")  # fmt: skip
    report(request, f"analysis image {ANALYSIS_IMAGE}: built in {analysis_seconds:.1f} s, "
                    f"{podman.size(ANALYSIS_IMAGE) / 1e6:.0f} MB")  # fmt: skip
    return Built(podman, base, seconds, analysis_seconds, folder, digest, canaries)


# ------------------------------------------------------------------------------- the images


def test_images_run_as_non_root_without_source_wheels_or_secrets(built: Built) -> None:
    podman = built.podman
    for image in (FLAME_IMAGE, ANALYSIS_IMAGE):
        config = podman.inspect(image)["Config"]
        assert isinstance(config, dict) and config.get("User") == f"{UID}:{UID}", config
        who = podman("run", "--rm", *podman.runtime, *podman.limits, "--entrypoint", "id",
                     image, timeout=120)  # fmt: skip
        assert who.stdout.startswith(f"uid={UID}(flame) gid={UID}(flame)"), who.stdout
    with podman.filesystem(ANALYSIS_IMAGE) as tar:
        names, found = scan(tar, built.canaries)
    assert not found, f"planted secrets reached the image: {found}"
    with podman.filesystem(built.base) as tar:
        base_names, _ = scan(tar, ())
    added = sorted(set(names) - set(base_names))  # what flame's and the analysis's layers add
    forbidden = [
        n for n in added
        if n.startswith(("/src/", "/wheels", "/tmp/flame-", "/root/.cache", "/home/flame/.cache"))
        or n.endswith((".whl", "/.env", "/node.key", "/pyproject.toml"))
        or "/.cache/pip" in n
    ]  # fmt: skip
    assert not forbidden, f"source tree, wheel or cache in the image: {forbidden[:10]}"
    assert sorted(n for n in names if n.startswith("/app/")) == [
        "/app/analysis.py",
        "/app/requirements.txt",
    ]
    assert any(n.endswith("-packages/flame/__init__.py") for n in added)
    assert any(n.endswith("-packages/sortedcontainers/__init__.py") for n in added)
    # the analysis code belongs to root: the node's process may read it, never change it
    touch = podman("run", "--rm", *podman.runtime, *podman.limits, "--entrypoint", "touch",
                   ANALYSIS_IMAGE, "/app/analysis.py", timeout=120, check=False)  # fmt: skip
    assert touch.returncode != 0 and "Permission denied" in touch.stderr


def test_the_image_carries_the_node_runtime_extras_only(built: Built) -> None:
    """A data holder's SQL source runs in the node runtime (psycopg in the image); what analyze
    itself needs, OpenDP included, comes from the analysis's requirements.txt."""
    modules = "('psycopg', 'opendp')"
    query = f"import importlib.util as u; print(*(bool(u.find_spec(m)) for m in {modules}))"
    podman = built.podman
    probe = podman("run", "--rm", *podman.runtime, *podman.limits, "--entrypoint", "python3",
                   FLAME_IMAGE, "-c", query, timeout=120)  # fmt: skip
    assert probe.stdout.split() == ["True", "False"], probe.stdout + probe.stderr


def test_analysis_image_is_labelled_with_the_code_hash(built: Built) -> None:
    labels = built.podman.inspect(ANALYSIS_IMAGE)["Config"]
    assert isinstance(labels, dict)
    assert labels["Labels"][IMAGE_LABEL] == built.code_sha256


def test_the_two_file_template_project_builds_as_it_is(built: Built, tmp_path: Path) -> None:
    folder = tmp_path / "templates"
    _flame_cli("init", str(folder))
    digest = analysis_code_hash(folder)
    tag = "localhost/flame-test-templates:latest"
    _, done = built.podman.build(
        folder, tag, {"FLAME_IMAGE": FLAME_IMAGE, "FLAME_CODE_SHA256": digest}, no_cache=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "names no packages; nothing to install" in done.stdout + done.stderr
    listing = built.podman("run", "--rm", *built.podman.runtime, *built.podman.limits,
                           "--entrypoint", "ls", tag, "/app", timeout=120)  # fmt: skip
    assert listing.stdout.split() == [
        "aggregator_generic.py", "analyzer_generic.py", "main_generic.py", "requirements.txt",
    ]  # fmt: skip
    labels = built.podman.inspect(tag)["Config"]
    assert isinstance(labels, dict) and labels["Labels"][IMAGE_LABEL] == digest


def test_the_build_refuses_a_wrong_or_missing_code_hash(built: Built) -> None:
    for given, says in (("0" * 64, "is not the hash of the code"), ("", "no FLAME_CODE_SHA256")):
        _, done = built.podman.build(
            built.folder, "localhost/flame-test-refused:latest",
            {"FLAME_IMAGE": FLAME_IMAGE, "FLAME_CODE_SHA256": given},
        )  # fmt: skip
        assert done.returncode != 0
        assert says in done.stderr + done.stdout
        assert built.code_sha256 in done.stderr + done.stdout  # names the right one


def test_a_requirement_with_a_wrong_hash_fails_the_build(built: Built, tmp_path: Path) -> None:
    folder = tmp_path / "tampered"
    folder.mkdir()
    for name in ("Dockerfile", ".dockerignore", "analysis.py"):
        (folder / name).write_bytes((built.folder / name).read_bytes())
    (folder / "requirements.txt").write_text(REQUIREMENT.replace("a163dc", "b163dc") + "\n")
    _, done = built.podman.build(
        folder, "localhost/flame-test-refused:latest",
        {"FLAME_IMAGE": FLAME_IMAGE, "FLAME_CODE_SHA256": built.code_sha256},
    )  # fmt: skip
    assert done.returncode != 0
    assert "DO NOT MATCH THE HASHES" in done.stdout + done.stderr


# ------------------------------------------------------------------------------- the federation


@dataclass
class Federation:
    names: dict[str, str]  # node id -> container name
    processes: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]
    results: Path
    analysis_id: str

    def stderr(self, node: str) -> str:
        return self.logs[node].read_text(errors="replace")


def _flame_cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "flame", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"flame {' '.join(args[:2])}: {done.stderr}"
    return done.stdout


def _node_secrets(folder: Path, token: str) -> dict[str, str]:
    """One secrets folder per node, as each host would mount it read-only at /run/secrets:
    the broker token, and (once flame has identities) the node's own signing key and the
    federation's roster, made with `flame keys identity` and `flame roster add`. Returns the
    settings pointing at them."""
    env = {"FLAME_BROKER__TOKEN_FILE": "/run/secrets/broker_token"}
    for node in ("aggregator", *NODES):
        (folder / node).mkdir(parents=True)
        (folder / node / "broker_token").write_text(token)
    if IDENTITIES:
        keys, roster = folder / "_keys", folder / "_roster.toml"
        for node in ("aggregator", *NODES):
            _flame_cli("keys", "identity", node, "--out", str(keys))
            role = "aggregation" if node == "aggregator" else "analysis"
            _flame_cli("roster", "add", str(roster), node, "--role", role,
                       "--public-key", str(keys / f"{node}.pub"))  # fmt: skip
        for node in ("aggregator", *NODES):
            (folder / node / "identity.key").write_bytes((keys / f"{node}.key").read_bytes())
            (folder / node / "roster.toml").write_bytes(roster.read_bytes())
        env |= {
            "FLAME_ROSTER": "/run/secrets/roster.toml",
            "FLAME_IDENTITY__KEY_FILE": "/run/secrets/identity.key",
        }
    for node in ("aggregator", *NODES):
        for file in (folder / node).iterdir():
            _owned_by_runtime_user(file, 0o400)
        _owned_by_runtime_user(folder / node, 0o500)
    return env


@pytest.fixture
def federation_env(built: Built, tmp_path: Path) -> Iterator[tuple[dict[str, str], Path, Path]]:
    from broker import Broker

    secrets_dir = tmp_path / "secrets"
    (tmp_path / "results").mkdir()
    results = _owned_by_runtime_user(tmp_path / "results", 0o700)
    with Broker(users=("aggregator", *NODES)) as broker:
        if broker.kind != "mosquitto":
            pytest.skip("the container federation needs the mosquitto binary on the host")
        env = {
            "FLAME_PARTICIPANTS": ",".join(NODES),
            "FLAME_BROKER__URL": broker.url,
            "FLAME_PRESENCE_TIMEOUT": "120",
            "FLAME_EPOCH_TIMEOUT": "60",
            **_node_secrets(secrets_dir, broker.password),
        }
        yield env, secrets_dir, results


def _start(
    built: Built,
    env: dict[str, str],
    secrets_dir: Path,
    results: Path,
    tmp_path: Path,
    nodes: tuple[str, ...] = ("aggregator", *NODES),
) -> Federation:
    podman = built.podman
    analysis_id = env["FLAME_ANALYSIS_ID"]
    names, processes, logs = {}, {}, {}
    for node in nodes:
        name = f"flame-test-{analysis_id}-{node}".replace("_", "-")
        flags = [
            "--rm", "--name", name, "--network=host", "--read-only", *podman.runtime,
            *podman.limits, "-v", f"{secrets_dir / node}:/run/secrets:ro",
        ]  # fmt: skip
        node_env = {**env, "FLAME_NODE_ID": node}
        if node == "aggregator":
            node_env |= {"FLAME_ROLE": "aggregation", "FLAME_STORAGE__RESULTS_DIR": "/results"}
            flags += ["-v", f"{results}:/results"]
        else:
            node_env |= {"FLAME_ROLE": "analysis", "FLAME_DATA_DIR": "/data"}
            if APPROVAL:  # the node runs only code its operator approved: the image's label
                node_env.setdefault("FLAME_APPROVED_CODE", built.code_sha256)
            flags += ["-v", f"{built.folder / 'data' / node}:/data:ro"]
        for key, value in node_env.items():
            flags += ["-e", f"{key}={value}"]
        logs[node] = tmp_path / f"{node}.log"
        with logs[node].open("wb") as err:
            processes[node] = subprocess.Popen(
                [podman.program, "run", *flags, ANALYSIS_IMAGE],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        names[node] = name
    return Federation(names, processes, logs, results, analysis_id)


def _finish(
    federation: Federation, podman: Podman, deadline: float
) -> tuple[dict[str, str], dict[str, float]]:
    """Each exited node's stdout and when it exited (monotonic); containers still running at
    the deadline are killed and left out."""
    outputs: dict[str, str] = {}
    exited: dict[str, float] = {}
    try:
        while len(exited) < len(federation.processes) and time.monotonic() < deadline:
            for node, process in federation.processes.items():
                if node not in exited and process.poll() is not None:
                    exited[node] = time.monotonic()
            time.sleep(0.1)
        for node in exited:
            out, _ = federation.processes[node].communicate(timeout=30)
            outputs[node] = out.decode(errors="replace")
    finally:
        for node, process in federation.processes.items():
            if process.poll() is None:
                podman("kill", federation.names[node], timeout=60, check=False)
                process.kill()
                process.wait(30)
    return outputs, exited


def _same(a: object, b: object) -> bool:
    """Equal up to float rounding (host and image may carry different numpy builds)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and (math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300))
        )
    return a == b


def _simulate(folder: Path) -> object:
    done = subprocess.run(
        [sys.executable, "-m", "flame", "simulate", str(folder), "--data", str(folder / "data"),
         "--quiet"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_federation_of_containers_equals_simulate(
    request: pytest.FixtureRequest,
    built: Built,
    federation_env: tuple[dict[str, str], Path, Path],
    tmp_path: Path,
) -> None:
    env, secrets_dir, results = federation_env
    env = {**env, "FLAME_ANALYSIS_ID": f"ct-{secrets.token_hex(4)}"}
    expected = _simulate(built.folder)
    started = time.monotonic()
    federation = _start(built, env, secrets_dir, results, tmp_path)
    outputs, _ = _finish(federation, built.podman, time.monotonic() + RUN_DEADLINE)
    seconds = time.monotonic() - started
    codes = {node: p.returncode for node, p in federation.processes.items()}
    for node, code in codes.items():
        assert node in outputs, f"{node} did not finish:\n{federation.stderr(node)[-3000:]}"
        assert code == 0, f"{node} exited {code}:\n{federation.stderr(node)[-3000:]}"
    for node, out in outputs.items():
        assert _same(json.loads(out), expected), (node, out, expected)
    stored = sorted(results.rglob("final/result.bin"))
    assert len(stored) == 1, sorted(results.rglob("*"))
    assert _same(unpack(stored[0].read_bytes()), expected)
    manifest = json.loads((stored[0].parent / "manifest.json").read_text())
    assert manifest["code_sha256"] == built.code_sha256  # the image label's hash
    if APPROVAL:  # the hash each node computed from /app is the label it was approved by
        for node in NODES:
            assert f"analysis code {built.code_sha256[:16]} is approved" in federation.stderr(node)
    for node in federation.logs:
        for secret in (secrets_dir / node).iterdir():  # the token, the signing key
            assert secret.read_text().strip() not in federation.stderr(node) + outputs[node]
    report(request, f"federation 1 aggregator + {len(NODES)} analysis containers: exit codes "
                    f"{sorted(set(codes.values()))} in {seconds:.1f} s; result equals `flame "
                    f"simulate` ({len(expected)} columns, stored result and manifest checked)")  # type: ignore[arg-type]  # fmt: skip


def test_stopping_one_container_stops_the_others_with_its_reason(
    request: pytest.FixtureRequest,
    built: Built,
    federation_env: tuple[dict[str, str], Path, Path],
    tmp_path: Path,
) -> None:
    env, secrets_dir, results = federation_env
    analysis_id = f"cs-{secrets.token_hex(4)}"
    # epochs take well under a second; without a stop notice the others wait this long
    env |= {"FLAME_ANALYSIS_ID": analysis_id, "FLAME_EPOCHS": "100000", "FLAME_EPOCH_TIMEOUT": "20"}
    federation = _start(built, env, secrets_dir, results, tmp_path)
    try:
        checkpoint = results / AnalysisLayout(analysis_id).checkpoint(2)
        deadline = time.monotonic() + RUN_DEADLINE
        while not checkpoint.exists() and time.monotonic() < deadline:
            exited = {
                n: p.returncode for n, p in federation.processes.items() if p.poll() is not None
            }
            assert not exited, f"exited before the stop: {exited}\n" + "\n".join(
                federation.stderr(n)[-1500:] for n in exited
            )
            time.sleep(0.2)
        assert checkpoint.exists(), "the run never reached epoch 2"
        victim = "clinic_b"
        stopped_at = time.monotonic()
        built.podman("stop", "--time", "30", federation.names[victim], timeout=120)
        stop_seconds = time.monotonic() - stopped_at
    except BaseException:
        _finish(federation, built.podman, time.monotonic())
        raise
    outputs, exited = _finish(federation, built.podman, time.monotonic() + 120)
    codes = {node: p.returncode for node, p in federation.processes.items()}
    # SIGINT (the image's STOPSIGNAL): a clean stop, exit code 128 + 2
    assert codes[victim] == 130, f"{victim} exited {codes[victim]}:\n{federation.stderr(victim)}"
    others = [n for n in ("aggregator", *NODES) if n != victim]
    for node in others:
        log = federation.stderr(node)
        assert node in outputs, f"{node} still ran 120 s after {victim} stopped:\n{log[-2000:]}"
        assert codes[node] == 1, f"{node} exited {codes[node]}:\n{log[-2000:]}"
        last = [line for line in log.splitlines() if line.startswith("flame: ")]
        assert last and victim in last[-1], f"{node}'s exit does not name {victim}:\n{log[-2000:]}"
    slowest = max(exited[n] for n in others) - stopped_at
    why = [
        line for line in federation.stderr("aggregator").splitlines() if line.startswith("flame")
    ]
    report(request, f"podman stop {victim} mid-run: it stopped in {stop_seconds:.1f} s (exit "
                    f"{codes[victim]}); the other {len(others)} exited "
                    f"{sorted({codes[n] for n in others})} naming it, the last "
                    f"{slowest:.1f} s after the stop; aggregator: {why[-1]!r}")  # fmt: skip


def test_sigterm_stops_a_waiting_container_with_143(
    request: pytest.FixtureRequest,
    built: Built,
    federation_env: tuple[dict[str, str], Path, Path],
    tmp_path: Path,
) -> None:
    """PID 1 ignores a signal it has no handler for: the node must install one for SIGTERM."""
    env, secrets_dir, results = federation_env
    env |= {"FLAME_ANALYSIS_ID": f"ct-{secrets.token_hex(4)}"}
    federation = _start(built, env, secrets_dir, results, tmp_path, nodes=("aggregator",))
    try:
        name = federation.names["aggregator"]
        deadline = time.monotonic() + 120
        while (
            "connected to broker" not in federation.stderr("aggregator")
            and time.monotonic() < deadline
        ):
            assert federation.processes["aggregator"].poll() is None, federation.stderr(
                "aggregator"
            )
            time.sleep(0.2)
        sent = time.monotonic()
        built.podman("kill", "--signal", "TERM", name, timeout=60)
    except BaseException:
        _finish(federation, built.podman, time.monotonic())
        raise
    _, exited = _finish(federation, built.podman, time.monotonic() + 60)
    log = federation.stderr("aggregator")
    assert "aggregator" in exited, f"SIGTERM did not stop the container:\n{log[-2000:]}"
    assert federation.processes["aggregator"].returncode == 143, log[-2000:]
    assert "flame: stopped: SIGTERM" in log
    report(request, f"podman kill -s TERM on a waiting aggregator: exit 143 after "
                    f"{exited['aggregator'] - sent:.1f} s")  # fmt: skip


@pytest.mark.skipif(not APPROVAL, reason="this flame has no FLAME_APPROVED_CODE yet")
def test_a_node_refuses_an_image_whose_code_it_has_not_approved(
    built: Built, federation_env: tuple[dict[str, str], Path, Path], tmp_path: Path
) -> None:
    env, secrets_dir, results = federation_env
    env |= {"FLAME_ANALYSIS_ID": f"ct-{secrets.token_hex(4)}", "FLAME_APPROVED_CODE": "0" * 64}
    federation = _start(built, env, secrets_dir, results, tmp_path, nodes=("clinic_a",))
    _, exited = _finish(federation, built.podman, time.monotonic() + 120)
    log = federation.stderr("clinic_a")
    assert "clinic_a" in exited, log[-2000:]
    assert federation.processes["clinic_a"].returncode == 2, log[-2000:]
    assert f"(SHA-256 {built.code_sha256}) is not approved" in log

"""The deployment kit under a real engine: `flame deploy kube` manifests run by `podman kube play`.

Opt-in like tests/test_container_engine.py (FLAME_CONTAINER_TESTS=1, marker `container`), whose
image fixture it shares: flame's image and an analysis image labelled with its code hash. Here
`flame federation init` makes the kit, `flame deploy kube --host-network` the manifests, the
broker image is built from the Containerfile written next to them (FROM flame's image), and
`podman kube play` runs broker, aggregator and three analysis nodes; then the same with
`flame deploy compose` and `podman-compose up` (skipped when podman-compose is missing). Every
node's result must equal `flame simulate`'s, and the aggregator's stored result too.

One translation, for podman 4.3 (Debian 12) only: its `kube play` ignores Secret objects in
the file and writes a Secret volume's files base64-encoded, so each Secret's files are
written to a host folder and its volume becomes a hostPath volume of that folder. Everything
else (pods, init containers, ConfigMaps, security contexts) runs as generated.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from broker import free_port
from test_container_engine import (  # the shared image fixture and helpers
    ANALYSIS_IMAGE,
    FLAME_IMAGE,
    NODES,
    RUN_DEADLINE,
    UID,
    Built,
    _owned_by_runtime_user,
    _same,
    _simulate,
    built,
    report,
)

from flame.ops.deploy_spec import BROKER_IMAGE
from flame.wire.envelope import unpack

pytestmark = pytest.mark.container
__all__ = ["built"]  # the fixture, imported for pytest


def _flame(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "flame", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"flame {' '.join(args[:2])}: {done.stdout}{done.stderr}"
    return done.stdout


def _secrets_on_host(documents: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """podman 4.3: each Secret's files in a host folder (0400, the pods' user), its volumes
    turned into hostPath volumes of that folder; the Secret objects dropped."""
    places: dict[str, str] = {}
    for document in documents:
        if document["kind"] != "Secret":
            continue
        name = document["metadata"]["name"]
        place = folder / name
        place.mkdir(parents=True)
        for key, value in document["data"].items():
            path = place / key
            path.write_bytes(base64.b64decode(value))
            _owned_by_runtime_user(path, 0o400)
        _owned_by_runtime_user(place, 0o500)
        places[name] = str(place)
    kept = []
    for document in documents:
        if document["kind"] == "Secret":
            continue
        if document["kind"] == "Pod":
            for volume in document["spec"]["volumes"]:
                if "secret" in volume:
                    source = volume.pop("secret")
                    assert source["defaultMode"] == 0o400
                    volume["hostPath"] = {"path": places[source["secretName"]], "type": "Directory"}
        kept.append(document)
    return kept


def _result_line(logs: str) -> Any:
    """The node's stdout line (its result) among its JSON log lines."""
    for line in reversed(logs.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if not (isinstance(value, dict) and "level" in value and "logger" in value):
            return value
    raise AssertionError(f"no result line in:\n{logs[-2000:]}")


def _kit(built: Built, tmp_path: Path) -> tuple[Path, Path]:
    """A federation kit for NODES on a free port, approving the analysis image's code; and
    the aggregator's results folder (writable by the pods' user)."""
    kit = tmp_path / "kit"
    (tmp_path / "results").mkdir()
    results = _owned_by_runtime_user(tmp_path / "results", 0o700)
    data = [f"--data={node}={built.folder / 'data' / node}" for node in NODES]
    _flame("federation", "init", str(kit), "--nodes", ",".join(NODES),
           "--port", str(free_port()), "--analysis-id", f"kp-{secrets.token_hex(4)}",
           "--approve", str(built.folder), *data)  # fmt: skip
    return kit, results


def _build_broker(built: Built, out: Path) -> float:
    """The broker's image, from the recipe written next to the manifests: flame's + Mosquitto."""
    podman = built.podman
    started = time.monotonic()
    done = podman("build", *podman.build_flags(), "-f", str(out / "broker.Containerfile"),
                  f"--build-arg=FLAME_IMAGE={FLAME_IMAGE}", "-t", BROKER_IMAGE, str(out),
                  timeout=900, check=False)  # fmt: skip
    assert done.returncode == 0, f"broker image build failed:\n{done.stdout[-3000:]}{done.stderr}"
    return time.monotonic() - started


def _engine_env(tmp_path: Path, runtime: bool = False) -> dict[str, str]:
    """podman's default open-files limit is above this sandbox's, and neither kube play nor
    podman-compose passes --ulimit: a containers.conf with this process's limits."""
    conf = tmp_path / "containers.conf"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    text = f'[containers]\ndefault_ulimits = ["nofile={soft}:{hard}", "nproc=16384:16384"]\n'
    if runtime:  # podman-compose has no --runtime either
        text += '[engine]\nruntime = "runc"\n'
    conf.write_text(text)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def _check_results(
    built: Built, kit: Path, results: Path, logs: dict[str, str], codes: dict[str, int]
) -> Any:
    """Every node exited 0 with `flame simulate`'s result; the stored result is the same."""
    expected = _simulate(built.folder)
    for node, code in codes.items():
        assert code == 0, f"{node} exited {code}:\n{logs[node][-3000:]}"
    for node in NODES:
        assert f"analysis code {built.code_sha256[:16]} is approved" in logs[node]
    for node, text in logs.items():
        assert _same(_result_line(text), expected), (node, text[-1000:], expected)
    stored = sorted(results.rglob("final/result.bin"))
    assert len(stored) == 1, sorted(results.rglob("*"))
    assert _same(unpack(stored[0].read_bytes()), expected)
    manifest = json.loads((stored[0].parent / "manifest.json").read_text())
    assert manifest["code_sha256"] == built.code_sha256
    for node in ("aggregator", *NODES):  # the signing key and token never reach a log
        for secret in (kit / "keys" / f"{node}.key", kit / "broker/tokens" / f"{node}.token"):
            assert secret.read_text().strip() not in logs[node]
    return expected


def _wait(built: Built, names: dict[str, str]) -> tuple[dict[str, int], dict[str, str]]:
    """Each container's exit code (within RUN_DEADLINE) and its whole log."""
    podman = built.podman
    codes: dict[str, int] = {}
    deadline = time.monotonic() + RUN_DEADLINE
    for node, container in names.items():
        left = max(1.0, deadline - time.monotonic())
        waited = podman("wait", container, timeout=left + 30, check=False)
        codes[node] = int(waited.stdout.strip() or -1)
    logs = {}
    for node, container in names.items():
        done = podman("logs", container, timeout=60, check=False)
        logs[node] = done.stdout + done.stderr
    return codes, logs


def test_generated_kube_manifests_run_a_federation_that_equals_simulate(
    request: pytest.FixtureRequest, built: Built, tmp_path: Path
) -> None:
    podman = built.podman
    kit, results = _kit(built, tmp_path)
    out = tmp_path / "kube"
    _flame("deploy", "kube", "--federation", str(kit), "--image", ANALYSIS_IMAGE,
           "--out", str(out), "--host-network", "--results", str(results))  # fmt: skip
    broker_seconds = _build_broker(built, out)
    documents = list(yaml.safe_load_all((out / "federation.yaml").read_text()))
    played = tmp_path / "played.yaml"
    played.write_text(yaml.safe_dump_all(_secrets_on_host(documents, tmp_path / "secrets")))
    env = _engine_env(tmp_path)

    def kube(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [podman.program, *podman.runtime, "kube", *args],
            capture_output=True, text=True, timeout=timeout, check=False, env=env,
        )  # fmt: skip

    started = time.monotonic()
    names = {node: f"flame-{node.replace('_', '-')}-node" for node in ("aggregator", *NODES)}
    try:
        play = kube("play", str(played))
        assert play.returncode == 0, play.stdout[-3000:] + play.stderr[-3000:]
        codes, logs = _wait(built, names)
        seconds = time.monotonic() - started
        _check_results(built, kit, results, logs, codes)
        user = podman("inspect", "--format", "{{.Config.User}}", names["clinic_a"], timeout=60)
        assert user.stdout.strip() in (f"{UID}", f"{UID}:{UID}"), user.stdout
    finally:
        kube("down", str(played), timeout=120)
        volumes = podman("volume", "ls", "--format", "{{.Name}}", timeout=60, check=False)
        for volume in volumes.stdout.split():
            if volume.startswith("flame-"):
                podman("volume", "rm", "--force", volume, timeout=60, check=False)
    report(request, f"podman kube play of `flame deploy kube`: broker image built in "
                    f"{broker_seconds:.1f} s; broker + aggregator + {len(NODES)} analysis pods, "
                    f"exit codes {sorted(set(codes.values()))} in {seconds:.1f} s; every result "
                    f"equals `flame simulate`")  # fmt: skip


def test_the_generated_compose_file_runs_a_federation_that_equals_simulate(
    request: pytest.FixtureRequest, built: Built, tmp_path: Path
) -> None:
    compose = shutil.which("podman-compose")
    if compose is None:
        pytest.skip("podman-compose is not installed (.ci/run installs Debian's)")
    podman = built.podman
    kit, results = _kit(built, tmp_path)
    out = tmp_path / "compose"
    _flame("deploy", "compose", "--federation", str(kit), "--image", ANALYSIS_IMAGE,
           "--out", str(out), "--results", str(results))  # fmt: skip
    _build_broker(built, out)
    project = f"flame{secrets.token_hex(4)}"
    env = _engine_env(tmp_path, runtime=True)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [compose, "-p", project, "-f", str(out / "compose.yaml"), *args],
            capture_output=True, text=True, timeout=300, check=False, env=env, cwd=out,
        )  # fmt: skip

    started = time.monotonic()
    try:
        up = run("up", "-d")
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        names = {}
        for node in ("aggregator", *NODES):  # found by label: engines name them differently
            service = f"flame-{node.replace('_', '-')}"
            found = podman("ps", "-a", "--format", "{{.Names}}",
                           "--filter", f"label=com.docker.compose.project={project}",
                           "--filter", f"label=com.docker.compose.service={service}",
                           timeout=60).stdout.split()  # fmt: skip
            assert len(found) == 1, (service, found, up.stdout[-2000:])
            names[node] = found[0]
        codes, logs = _wait(built, names)
        seconds = time.monotonic() - started
        _check_results(built, kit, results, logs, codes)
    finally:
        run("down", "-v")
        podman("network", "rm", f"{project}_default", timeout=60, check=False)
    report(request, f"podman-compose up of `flame deploy compose`: broker + aggregator + "
                    f"{len(NODES)} analysis containers, exit codes {sorted(set(codes.values()))} "
                    f"in {seconds:.1f} s; every result equals `flame simulate`")  # fmt: skip

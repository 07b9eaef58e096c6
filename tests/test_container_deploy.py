"""The deployment kit under a real engine: `flame deploy kube` manifests run by `podman kube play`.

Opt-in like tests/test_container_engine.py (FLAME_CONTAINER_TESTS=1, marker `container`), whose
image fixture it shares: flame's image and an analysis image labelled with its code hash. Here
`flame federation init` makes the kit, `flame deploy kube --host-network` the manifests, the
broker image is built from the Containerfile written next to them (FROM flame's image), and
`podman kube play` runs broker, aggregator and three analysis nodes. Every node's result must
equal `flame simulate`'s, and the aggregator's stored result too.

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


def test_generated_kube_manifests_run_a_federation_that_equals_simulate(
    request: pytest.FixtureRequest, built: Built, tmp_path: Path
) -> None:
    podman = built.podman
    analysis_id = f"kp-{secrets.token_hex(4)}"
    port = free_port()
    kit, out = tmp_path / "kit", tmp_path / "kube"
    (tmp_path / "results").mkdir()
    results = _owned_by_runtime_user(tmp_path / "results", 0o700)
    data = [f"--data={node}={built.folder / 'data' / node}" for node in NODES]
    _flame("federation", "init", str(kit), "--nodes", ",".join(NODES), "--port", str(port),
           "--analysis-id", analysis_id, "--approve", str(built.folder), *data)  # fmt: skip
    _flame("deploy", "kube", "--federation", str(kit), "--image", ANALYSIS_IMAGE,
           "--out", str(out), "--host-network", "--results", str(results))  # fmt: skip

    # the broker's image, from the recipe written next to the manifests: flame's + Mosquitto
    started = time.monotonic()
    done = podman("build", *podman.build_flags(), "-f", str(out / "broker.Containerfile"),
                  f"--build-arg=FLAME_IMAGE={FLAME_IMAGE}", "-t", BROKER_IMAGE, str(out),
                  timeout=900, check=False)  # fmt: skip
    assert done.returncode == 0, f"broker image build failed:\n{done.stdout[-3000:]}{done.stderr}"
    broker_seconds = time.monotonic() - started

    documents = list(yaml.safe_load_all((out / "federation.yaml").read_text()))
    played = tmp_path / "played.yaml"
    played.write_text(yaml.safe_dump_all(_secrets_on_host(documents, tmp_path / "secrets")))
    # podman's default open-files limit is above this sandbox's; kube play has no --ulimit
    conf = tmp_path / "containers.conf"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    conf.write_text(f'[containers]\ndefault_ulimits = ["nofile={soft}:{hard}", '
                    f'"nproc=16384:16384"]\n')  # fmt: skip
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def kube(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [podman.program, *podman.runtime, "kube", *args],
            capture_output=True, text=True, timeout=timeout, check=False, env=env,
        )  # fmt: skip

    expected = _simulate(built.folder)
    started = time.monotonic()
    try:
        play = kube("play", str(played))
        assert play.returncode == 0, play.stdout[-3000:] + play.stderr[-3000:]
        names = {node: f"flame-{node.replace('_', '-')}-node" for node in ("aggregator", *NODES)}
        codes: dict[str, int] = {}
        deadline = time.monotonic() + RUN_DEADLINE
        for node, container in names.items():
            left = max(1.0, deadline - time.monotonic())
            waited = podman("wait", container, timeout=left + 30, check=False)
            codes[node] = int(waited.stdout.strip() or -1)
        seconds = time.monotonic() - started
        logs = {
            node: podman("logs", container, timeout=60).stdout
            + podman("logs", container, timeout=60).stderr
            for node, container in names.items()
        }
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

"""A federated analysis over FHIR servers (one per node) with results on a real S3 server,
and node start-up refusing bad tokens before touching any data."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from servers.fhir_server import DataApiServer
from servers.s3_server import S3Server

import flame
from flame.aggregator.run_store import StorageRunStore
from flame.clients.data_api_client import open_source
from flame.clients.minio_client import MinioStore
from flame.clients.object_store import SHA256_META, AnalysisLayout
from flame.config import DataSourceSettings, StorageSettings, load_config
from flame.data import Data
from flame.wire.envelope import unpack

SIZES = {"hospital_a": 130, "hospital_b": 260, "hospital_c": 41}


def analyze(data, epoch, previous):
    table = data.source("fhir").table("Observation", {"value": "valueQuantity.value"})
    values = table["value"][~np.isnan(table["value"])]
    return {"n": int(values.size), "sum": float(values.sum())}


def aggregate(results, epoch, previous):
    n = sum(r["n"] for r in results.values())
    return {"n": n, "mean": sum(r["sum"] for r in results.values()) / n}


@pytest.fixture
def fhir_servers():
    servers = {node: DataApiServer(observations=size).start() for node, size in SIZES.items()}
    yield servers
    for server in servers.values():
        server.stop()


def test_federated_mean_over_fhir_equals_pooled_and_lands_in_s3(
    fhir_servers, s3_server: S3Server, s3_bucket: str
) -> None:
    nodes = {
        node: Data(
            {
                "fhir": open_source(
                    DataSourceSettings(
                        name="fhir", kind="fhir", url=server.fhir_url, token=server.token
                    )
                )
            },
            node_id=node,
        )
        for node, server in fhir_servers.items()
    }
    store = MinioStore.from_settings(StorageSettings(**s3_server.settings(bucket=s3_bucket)))
    run_store = StorageRunStore(store, "fhir-mean", "aggregator", provenance={"code": "test"})
    config = load_config(analysis_id="fhir-mean", epochs=1)
    result = flame.simulate(analyze, aggregate, data=nodes, store=run_store, config=config)

    pooled = [
        o["valueQuantity"]["value"]
        for server in fhir_servers.values()
        for o in server.resources["Observation"]
        if "valueQuantity" in o
    ]
    assert result.value["n"] == len(pooled)
    assert result.value["mean"] == pytest.approx(float(np.mean(pooled)), abs=1e-9, rel=0)
    for node, server in fhir_servers.items():  # every page was fetched, one request each
        pages = -(-SIZES[node] // server.default_page_size)
        assert len(server.requests_to("/fhir")) == pages

    layout = AnalysisLayout("fhir-mean")
    raw = s3_server.client()
    for key in (layout.final_result(), layout.manifest()):
        response = raw.get_object(s3_bucket, key)
        body = response.read()
        response.close()
        meta = raw.stat_object(s3_bucket, key).metadata
        recorded = meta.get(f"x-amz-meta-{SHA256_META}") or meta.get(SHA256_META)
        assert recorded == hashlib.sha256(body).hexdigest()
    assert unpack(store.get_bytes(layout.final_result())) == result.value
    manifest = store.get_json(layout.manifest())
    assert manifest["analysis_id"] == "fhir-mean"
    assert manifest["history"][0]["nodes"] == sorted(SIZES)
    assert (
        manifest["result"]["sha256"]
        == hashlib.sha256(store.get_bytes(layout.final_result())).hexdigest()
    )
    assert result.location is not None and "final/result.bin" in result.location


def _rsa_pem(tmp_path: Path) -> tuple[bytes, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = tmp_path / "issuer.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def _tokens(tmp_path: Path) -> dict[str, tuple[str, dict[str, str]]]:
    private, public = _rsa_pem(tmp_path)
    other, _ = _rsa_pem(tmp_path / "other" if (tmp_path / "other").mkdir() is None else tmp_path)
    now = int(time.time())
    signed = {"iss": "https://idp.test", "aud": "flame"}
    check = {"issuer": "https://idp.test", "audience": "flame", "verify_key_file": str(public)}
    return {
        "expired": (jwt.encode({**signed, "exp": now - 3600}, private, "RS256"), check),
        "not yet valid": (
            jwt.encode({**signed, "nbf": now + 3600, "exp": now + 7200}, private, "RS256"),
            check,
        ),
        "wrong audience": (
            jwt.encode({**signed, "aud": "other", "exp": now + 600}, private, "RS256"),
            check,
        ),
        "wrong signature": (jwt.encode({**signed, "exp": now + 600}, other, "RS256"), check),
        "garbage": ("not-a-token-at-all-" + "x" * 30, check),
    }


def test_bad_tokens_stop_the_node_before_it_touches_data(tmp_path, data_api) -> None:
    (tmp_path / "analysis.py").write_text(
        "def analyze(data):\n    return 1\n\ndef aggregate(results):\n    return 1\n"
    )
    for case, (token, checks) in _tokens(tmp_path).items():
        source = {"name": "fhir", "kind": "fhir", "url": data_api.fhir_url, "token": token}
        source.update(checks)
        env = {
            **os.environ,
            "FLAME_NODE_ID": "a",
            "FLAME_ROLE": "analysis",
            "FLAME_PARTICIPANTS": "a,b",
            "FLAME_BROKER__URL": "mqtt://127.0.0.1:9",
            "FLAME_DATA": json.dumps([source]),
        }
        data_api.reset()
        done = subprocess.run(
            [sys.executable, "-m", "flame", "run", str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = done.stdout + done.stderr
        assert done.returncode != 0, case
        assert "data API 'fhir'" in done.stderr, (case, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, (case, done.stderr)
        assert "Traceback" not in output
        assert token not in output and token[-20:] not in output, case
        assert data_api.requests == [], case


def test_valid_config_passes_token_checks(tmp_path, data_api) -> None:
    config = load_config(
        data=[{"name": "fhir", "kind": "fhir", "url": data_api.fhir_url, "token": data_api.token}]
    )
    from flame.clients.token import check_service_tokens

    infos = check_service_tokens(config)
    assert [info.service for info in infos] == ["data API 'fhir'"]

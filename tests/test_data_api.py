"""Data sources against real servers: the test FHIR / file API over HTTP, and moto for S3."""

from __future__ import annotations

import io
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest
from servers.fhir_server import TEST_FILES, DataApiServer, observation_value
from servers.s3_server import S3Server, free_port

from flame.clients.data_api_client import (
    FhirSource,
    HttpFileSource,
    HttpStatusError,
    S3Source,
    open_source,
    open_sources,
    probe_sources,
)
from flame.clients.token import TokenError, TokenSource
from flame.config import DataSourceSettings, TokenSettings
from flame.data import Data, FileSource, LocalSource
from flame.errors import DataError

pytest_plugins = ["servers.plugin"]


def fhir(server: DataApiServer, token: str | None = None, **options: object) -> FhirSource:
    settings = DataSourceSettings(
        name="fhir", kind="fhir", url=server.fhir_url, token=token or server.token
    )
    options.setdefault("backoff", 0.05)
    return FhirSource.from_settings(settings, TokenSource(settings, "data API 'fhir'"), **options)


# ------------------------------------------------------------------------------------ FHIR


def test_search_follows_every_page_in_order(data_api: DataApiServer) -> None:
    with fhir(data_api, page_size=30) as source:
        observations = list(source.search("Observation"))
    assert [o["id"] for o in observations] == [f"o{i}" for i in range(260)]
    calls = data_api.requests_to("/fhir")
    assert len(calls) == math.ceil(260 / 30)
    assert calls[0].path == "/fhir/Observation" and "_count=30" in calls[0].query
    assert all(c.path == "/fhir" and "_getpages=" in c.query for c in calls[1:])
    assert all(c.headers.get("Authorization") == f"Bearer {data_api.token}" for c in calls)


def test_search_is_lazy_page_by_page(data_api: DataApiServer) -> None:
    with fhir(data_api, page_size=50) as source:
        pages = source.pages("Observation")
        first = next(pages)
        assert len(first) == 50
        assert len(data_api.requests_to("/fhir")) == 1  # nothing fetched ahead
        sizes = [len(first)] + [len(page) for page in pages]
    assert sizes == [50, 50, 50, 50, 50, 10]


def test_search_parameters(data_api: DataApiServer) -> None:
    with fhir(data_api) as source:
        found = list(source.search("Observation", {"subject": "Patient/p3", "_count": 4}))
        assert [o["id"] for o in found] == [f"o{i}" for i in range(3, 260, 25)]
        assert source.count("Patient") == 25
        assert source.count("Observation", {"code": "8302-2"}) == len(range(0, 260, 3))


def test_table_conversion(data_api: DataApiServer) -> None:
    with fhir(data_api, page_size=100) as source:
        table = source.table(
            "Observation",
            {
                "value": "valueQuantity.value",
                "unit": "valueQuantity.unit",
                "subject": "subject.reference",
                "code": "code.coding.code",
                "code0": "code.coding.0.system",
                "missing": "effectiveDateTime",
            },
        )
    expected = np.array(
        [math.nan if (v := observation_value(i)) is None else v for i in range(260)]
    )
    assert table["value"].dtype == np.float64
    np.testing.assert_array_equal(table["value"], expected)  # NaN where the value is absent
    assert np.isnan(table["value"]).sum() == sum(observation_value(i) is None for i in range(260))
    assert table["subject"].dtype.kind == "U"
    assert table["subject"][:3].tolist() == ["Patient/p0", "Patient/p1", "Patient/p2"]
    assert table["unit"][5] == "" and table["unit"][1] == "kg"
    assert set(table["code"].tolist()) == {"8302-2", "29463-7"}
    assert set(table["code0"].tolist()) == {"http://loinc.org"}
    assert table["missing"].dtype == np.float64 and np.isnan(table["missing"]).all()


def test_bad_token_is_clear_and_not_retried(
    data_api: DataApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-token-0123456789abcdef"
    with fhir(data_api, token=wrong) as source:
        with pytest.raises(HttpStatusError) as caught:
            list(source.search("Observation", {"subject": "Patient/secret-query-value"}))
        message = str(caught.value)
        assert message.startswith("data source 'fhir': GET /fhir/Observation -> HTTP 401")
        assert "token rejected" in message and caught.value.status == 401
        assert wrong not in message and "secret-query-value" not in message
        assert len(data_api.requests_to("/fhir")) == 1
        with pytest.raises(TokenError) as probe_error:
            source.probe()
    assert str(probe_error.value) == "data API 'fhir': token rejected by the server (HTTP 401)"
    assert wrong not in caplog.text


def test_other_4xx_is_not_retried(data_api: DataApiServer) -> None:
    with fhir(data_api) as source, pytest.raises(HttpStatusError) as caught:
        list(source.search("Specimen"))
    assert caught.value.status == 404
    assert "unknown resource type Specimen" in str(caught.value)
    assert len(data_api.requests_to("/fhir")) == 1
    with fhir(data_api) as source, pytest.raises(DataError, match="is not a resource type"):
        list(source.search("../admin"))


def test_503_then_success(data_api: DataApiServer, caplog: pytest.LogCaptureFixture) -> None:
    data_api.add_fault("/fhir/Patient", 503)
    with fhir(data_api) as source:
        assert len(list(source.search("Patient"))) == 25
    statuses = [r.status for r in data_api.requests_to("/fhir/Patient")]
    assert statuses == [503, 200]
    assert "HTTP 503 Service Unavailable; retry 1/3" in caplog.text
    assert data_api.token is not None and data_api.token not in caplog.text


def test_persistent_5xx_gives_up(data_api: DataApiServer) -> None:
    data_api.add_fault("/fhir/Patient", 502, times=10)
    with fhir(data_api, retries=2) as source, pytest.raises(DataError) as caught:
        source.count("Patient")
    assert str(caught.value) == (
        "data source 'fhir': GET /fhir/Patient -> HTTP 502 Bad Gateway (after 3 attempts)"
    )
    assert len(data_api.requests_to("/fhir/Patient")) == 3


def test_429_retry_after_is_honoured_and_capped(data_api: DataApiServer) -> None:
    data_api.add_fault("/fhir/Patient", 429, retry_after="1")
    with fhir(data_api) as source:
        started = time.monotonic()
        assert source.count("Patient") == 25
        assert time.monotonic() - started >= 0.95
    data_api.add_fault("/fhir/Patient", 429, retry_after="3600")
    with fhir(data_api, max_backoff=0.2) as source:
        started = time.monotonic()
        assert source.count("Patient") == 25
        assert time.monotonic() - started < 1.0


def test_slow_response_times_out(data_api: DataApiServer) -> None:
    data_api.add_fault("/fhir/Patient", None, delay=3.0, times=2)
    with fhir(data_api, timeout=0.3, retries=1) as source:
        started = time.monotonic()
        with pytest.raises(DataError) as caught:
            source.count("Patient")
        elapsed = time.monotonic() - started
    assert str(caught.value) == (
        "data source 'fhir': GET /fhir/Patient -> timed out after 0.3 s (after 2 attempts)"
    )
    assert elapsed < 2.0


def test_connection_refused_names_the_source() -> None:
    url = f"http://127.0.0.1:{free_port()}/fhir"
    pattern = r"^data source 'ehr': GET /fhir/Patient -> connection failed \(ConnectError\)"
    source = FhirSource("ehr", url, None, retries=1, backoff=0.01)
    with source, pytest.raises(DataError, match=pattern):
        source.count("Patient")


def test_token_is_not_sent_to_another_host(data_api: DataApiServer) -> None:
    with fhir(data_api) as source, pytest.raises(DataError, match="another host"):
        source._request("GET", "http://elsewhere.example/fhir?_getpages=1")


def test_token_file_rotation(data_api: DataApiServer, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(data_api.token or "")
    settings = DataSourceSettings(
        name="fhir", kind="fhir", url=data_api.fhir_url, token_file=token_file
    )
    source = open_source(settings)
    assert isinstance(source, FhirSource)
    try:
        assert source.count("Patient") == 25
        data_api.token = "rotated-token-value"
        (tmp_path / "new").write_text("rotated-token-value")
        (tmp_path / "new").replace(token_file)
        assert source.count("Patient") == 25
    finally:
        data_api.token = "flame-test-token"
        source.close()


class SwitchingTokens(TokenSource):
    """Hands out the old token once, then the new one: a rotation racing a request."""

    def __init__(self, old: str, new: str) -> None:
        super().__init__(TokenSettings(token=new), "data API 'fhir'")
        self._queue = [old]

    def get(self) -> str | None:
        return self._queue.pop(0) if self._queue else super().get()


def test_401_after_rotation_retries_once_with_the_new_token(data_api: DataApiServer) -> None:
    tokens = SwitchingTokens("stale-token", data_api.token or "")
    with FhirSource("fhir", data_api.fhir_url, tokens) as source:
        assert source.count("Patient") == 25
    assert [r.status for r in data_api.requests_to("/fhir/Patient")] == [401, 200]


def test_probe_sources(data_api: DataApiServer, tmp_path: Path) -> None:
    good = open_sources(
        [
            DataSourceSettings(name="disk", kind="local", path=tmp_path),
            DataSourceSettings(
                name="ehr", kind="fhir", url=data_api.fhir_url, token=data_api.token
            ),
        ]
    )
    probe_sources(good)
    bad = open_sources(
        [DataSourceSettings(name="ehr", kind="fhir", url=data_api.fhir_url, token="nope-nope")]
    )
    with pytest.raises(TokenError, match=r"^data API 'ehr': token rejected by the server"):
        probe_sources(bad)


# ------------------------------------------------------------------------------ HTTP files


def files_source(server: DataApiServer, **options: object) -> HttpFileSource:
    settings = DataSourceSettings(
        name="files", kind="http", url=server.files_url, token=server.token
    )
    options.setdefault("backoff", 0.05)
    return HttpFileSource.from_settings(
        settings, TokenSource(settings, "data API 'files'"), **options
    )


def test_http_files_list_and_get(data_api: DataApiServer) -> None:
    with files_source(data_api) as source:
        assert isinstance(source, FileSource)
        assert source.files() == sorted(TEST_FILES)
        for name, content in TEST_FILES.items():
            with source.open(name) as stream:
                assert stream.read() == content
        table = Data({"files": source}).read_csv("cohort.csv")
    np.testing.assert_array_equal(table["age"], [34.0, 51.0, 47.0])
    assert math.isnan(table["weight"][2])


def test_http_large_file_streams_to_disk(data_api: DataApiServer) -> None:
    with files_source(data_api, spool_threshold=1024 * 1024) as source:
        small = source.open("cohort.csv")
        large = source.open("large.bin")
        try:
            assert not getattr(small, "_rolled", True)  # stayed in memory
            assert getattr(large, "_rolled", False)  # spilled to a temp file
            assert large.read() == TEST_FILES["large.bin"]
        finally:
            small.close()
            large.close()


def test_http_interrupted_download_is_retried(data_api: DataApiServer) -> None:
    data_api.add_fault("/files/large.bin", None, truncate=True)
    with files_source(data_api) as source, source.open("large.bin") as stream:
        assert stream.read() == TEST_FILES["large.bin"]
    assert len(data_api.requests_to("/files/large.bin")) == 2


def test_http_file_errors(data_api: DataApiServer) -> None:
    with files_source(data_api) as source:
        with pytest.raises(HttpStatusError, match=r"GET /files/nope\.csv -> HTTP 404"):
            source.open("nope.csv")
        with pytest.raises(DataError, match="must be relative"):
            source.open("../etc/passwd")
    with files_source(data_api) as source:
        data_api.token = "changed"
        try:
            with pytest.raises(TokenError, match=r"^data API 'files': token rejected"):
                source.probe()
        finally:
            data_api.token = "flame-test-token"


# -------------------------------------------------------------------------------------- S3


def test_s3_source_against_moto(s3_server: S3Server, s3_bucket: str) -> None:
    raw = s3_server.client()
    raw.make_bucket(s3_bucket)
    blobs = {
        "site-a/x.csv": b"a,b\n1,2\n",
        "site-a/sub/y.bin": b"\x00\x01" * 5000,
        "other.txt": b"no",
    }
    for key, data in blobs.items():
        raw.put_object(s3_bucket, key, io.BytesIO(data), len(data))
    settings = DataSourceSettings(
        name="bucket",
        kind="s3",
        url=s3_server.url,
        bucket=s3_bucket,
        prefix="site-a",
        access_key="k",
        secret_key="s",
        timeout=5.0,
    )
    source = open_source(settings)
    assert isinstance(source, S3Source) and isinstance(source, FileSource)
    source.probe()
    assert source.files() == ["sub/y.bin", "x.csv"]
    with source.open("sub/y.bin") as stream:
        assert stream.read() == blobs["site-a/sub/y.bin"]
    assert Data({"bucket": source}).read_csv()["b"].tolist() == [2.0]
    with pytest.raises(
        DataError, match=rf"^data source 'bucket': s3://{s3_bucket}/site-a/no\.csv: NoSuchKey"
    ):
        source.open("no.csv")
    missing = S3Source("bucket", source.client, "no-such-bucket-here")
    with pytest.raises(DataError, match="does not exist"):
        missing.probe()


def test_open_sources(tmp_path: Path, data_api: DataApiServer) -> None:
    (tmp_path / "a.csv").write_text("x\n1\n")
    sources = open_sources(
        [
            DataSourceSettings(name="disk", kind="local", path=tmp_path),
            DataSourceSettings(name="ehr", kind="fhir", url=data_api.fhir_url, token="t"),
        ]
    )
    assert isinstance(sources["disk"], LocalSource) and isinstance(sources["ehr"], FhirSource)
    ehr = sources["ehr"]
    assert isinstance(ehr, FhirSource)
    ehr.close()
    with pytest.raises(DataError, match="kind=fhir needs a url"):
        open_source(DataSourceSettings(name="x", kind="fhir"))
    with pytest.raises(DataError, match="two data sources are named"):
        open_sources([DataSourceSettings(name="d", path=tmp_path)] * 2)

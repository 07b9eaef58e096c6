"""pytest fixtures for the real test servers; list as `pytest_plugins = ["servers.plugin"]`.

Servers are session-scoped (starting moto takes about a second); the function-scoped
fixtures reset their state so tests stay independent.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from servers.fhir_server import DataApiServer
from servers.s3_server import S3Server

TEST_FILES = {
    "cohort.csv": b"age,weight\n34,70.5\n51,82.0\n47,\n",
    "notes/readme.txt": "hello from the data API \u2713\n".encode(),
    "dir with space/r\u00e9sum\u00e9.txt": b"unicode and spaces in names\n",
    "large.bin": bytes(range(256)) * (12 * 1024 * 4),  # 12 MiB
}

_bucket_ids = itertools.count(1)


@pytest.fixture(scope="session")
def data_api_server() -> Iterator[DataApiServer]:
    server = DataApiServer(files=TEST_FILES).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def data_api(data_api_server: DataApiServer) -> Iterator[DataApiServer]:
    """The session's data API with faults and request log cleared before and after."""
    data_api_server.reset()
    yield data_api_server
    data_api_server.reset()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket name for one test (created by the code under test)."""
    return f"flame-test-{next(_bucket_ids)}"

"""pytest fixtures for the real test servers; list as `pytest_plugins = ["servers.plugin"]`.

Servers are session-scoped (starting moto takes about a second); the function-scoped
fixtures reset their state so tests stay independent.
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Callable, Iterator

import pytest

from servers.fhir_server import TEST_FILES, DataApiServer
from servers.postgres import PostgresServer
from servers.s3_server import S3Server

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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL (the local one on 5432, else a throwaway initdb cluster)."""
    try:
        server = PostgresServer().start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"PostgreSQL is not available: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_databases(postgres_server: PostgresServer) -> Iterator[Callable[[], str]]:
    """A factory of fresh databases for one test, all dropped at its end."""
    made: list[str] = []

    def make() -> str:
        made.append(postgres_server.create_database())
        return made[-1]

    yield make
    for name in made:
        postgres_server.drop_database(name)

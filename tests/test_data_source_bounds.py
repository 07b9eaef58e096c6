"""The bounds the data red team's fixes added (tests/test_attacks_data_redteam.py): a node's
call deadline over SQL and FHIR calls, the HTTP size cap, the token masked in a path, dot
names in a node folder, token files among the secrets, and unforeseen errors in the runtime
reaching the isolated analysis as a type name only. Servers are real ones on loopback."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from servers.postgres import PostgresServer
from test_attacks_data_redteam import TOKEN, _json, _Server

import flame
from flame.analysis.loader import load_analysis
from flame.clients.token import TokenSource
from flame.config import DataSourceSettings, TokenSettings, load_config
from flame.data import Data
from flame.data.sources.fhir import MAX_PAGES, MAX_RESOURCES, FhirSource
from flame.data.sources.http import HttpFileSource
from flame.data.sources.local import LocalSource
from flame.data.sources.sql import SqlSource
from flame.errors import DataError
from flame.utils.deadline import call_deadline, call_left


def test_call_left_is_capped_by_the_innermost_deadline() -> None:
    assert call_left(5.0) == 5.0
    with call_deadline(time.monotonic() + 2.0):
        assert 1.0 < call_left(5.0) <= 2.0
        with call_deadline(time.monotonic() + 100.0):  # a later end does not widen it
            assert call_left(5.0) <= 2.0
    assert call_left(5.0) == 5.0


def test_a_fhir_search_ends_at_the_call_deadline_with_the_default_caps() -> None:
    """What bounds a search served for an isolated analysis on a node: its epoch's deadline
    (the default caps, 10,000 pages and 1,000,000 resources, are backstops)."""
    assert (MAX_PAGES, MAX_RESOURCES) == (10_000, 1_000_000)
    base: list[str] = []

    def handle(request: BaseHTTPRequestHandler) -> None:
        link = [{"relation": "next", "url": f"{base[0]}/fhir/Observation?p={time.time_ns()}"}]
        _json(request, {"resourceType": "Bundle", "entry": [], "link": link})

    server = _Server(handle)
    base.append(server.base)
    source = FhirSource("fhir", server.base + "/fhir", timeout=2.0, retries=0)
    started = time.monotonic()
    try:
        with call_deadline(time.monotonic() + 1.5), pytest.raises(DataError, match="'fhir'"):
            list(source.search("Observation"))
        assert time.monotonic() - started < 4.0
    finally:
        source.close()
        server.stop()


def test_an_sql_statement_is_cut_at_the_call_deadline(
    postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    source = SqlSource("db", postgres_server.url(postgres_databases()))  # 300 s timeout
    try:
        started = time.monotonic()
        with call_deadline(time.monotonic() + 1.0), pytest.raises(DataError, match="deadline"):
            source.query("select pg_sleep(10) as s")
        assert time.monotonic() - started < 3.0
        assert source.query("select 1 as one").num_rows == 1  # the connection still serves
        with call_deadline(time.monotonic() - 1.0), pytest.raises(DataError, match="no time"):
            source.query("select 1 as one")
    finally:
        source.close()


def test_a_set_inside_a_query_does_not_reach_the_next_one(
    postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    source = SqlSource("db", postgres_server.url(postgres_databases()))
    try:
        source.query("select set_config('application_name', 'changed', false) as x")
        name = source.query("select current_setting('application_name') as n")
        assert name.column("n")[0].as_py() == "flame"
    finally:
        source.close()


def test_an_http_file_larger_than_max_bytes_is_refused() -> None:
    body = b"x" * 10_000

    def handle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    server = _Server(handle)
    source = HttpFileSource("api", server.base + "/files", timeout=2.0, retries=0, max_bytes=1000)
    try:
        with pytest.raises(DataError, match="larger than 1,000 bytes"):
            source.open("values.csv")
    finally:
        source.close()
        server.stop()


def test_a_token_a_server_puts_in_a_next_link_path_is_masked() -> None:
    """A next link on the same origin is followed with the token; its path then names the
    token in the error of a failing page, unless masked."""
    base: list[str] = []

    def handle(request: BaseHTTPRequestHandler) -> None:
        if TOKEN in request.path:
            _json(request, {"resourceType": "OperationOutcome"}, status=404)
            return
        link = [{"relation": "next", "url": f"{base[0]}/fhir/{TOKEN}"}]
        _json(request, {"resourceType": "Bundle", "entry": [], "link": link})

    server = _Server(handle)
    base.append(server.base)
    tokens = TokenSource(TokenSettings(token=SecretStr(TOKEN)), "data API 'fhir'")
    source = FhirSource("fhir", server.base + "/fhir", tokens, timeout=2.0, retries=0)
    try:
        with pytest.raises(DataError, match="HTTP 404 Not Found") as err:
            list(source.search("Observation"))
        assert TOKEN not in str(err.value)
    finally:
        source.close()
        server.stop()


def test_dot_names_are_neither_listed_nor_read(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("v\n1\n")
    (tmp_path / ".env").write_text("SECRET=1\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("x\n")
    source = LocalSource(tmp_path)
    assert source.files() == ["a.csv"]
    for name in (".env", ".git/config", "./.env"):
        with pytest.raises(DataError, match=r"'\.'"):
            source.open(name)


def test_a_token_file_is_among_the_secrets(tmp_path: Path) -> None:
    token_file = tmp_path / "api.token"
    token_file.write_text(TOKEN + "\n")
    config = load_config().model_copy(
        update={
            "data": [
                DataSourceSettings(name="api", kind="http", url="http://x", token_file=token_file),
                DataSourceSettings(name="gone", kind="http", url="http://y", token_file=tmp_path),
            ]
        }
    )
    secrets = config.secrets()
    assert TOKEN in secrets
    assert "" not in secrets  # the unreadable one (a folder) gives nothing


class _Broken:
    """A source whose call fails in a way no handler foresaw, its text naming a secret."""

    name = "broken"
    remote_methods = ("rows",)

    def rows(self) -> Any:
        raise RuntimeError(f"internal state {TOKEN}")


CALLS = """
def analyze(data):
    try:
        data.source("broken").rows()
    except Exception as exc:
        return {"got": type(exc).__name__ + ": " + str(exc)}
    return {"got": ""}

def aggregate(results):
    return results
"""


def test_an_unforeseen_error_serving_the_child_is_named_by_its_type_only(tmp_path: Path) -> None:
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(CALLS))
    functions = load_analysis(path).functions
    nodes = {"node-0": Data({"broken": _Broken()}, node_id="node-0")}
    result = flame.simulate(functions.analyze, functions.aggregate, data=nodes, isolate=True)
    text = json.dumps(getattr(result, "value", result), default=repr)
    assert "RuntimeError" in text
    assert TOKEN not in text and "internal state" not in text


def test_the_data_client_bounds_every_socket_operation_with_this_httpx() -> None:
    """The header bound reaches into httpx's pool (no public hook): if an httpx release moves
    it, this fails here instead of the bound silently stopping (the client only warns)."""
    from flame.data.sources._deadline_io import _Backend, deadline_client

    with deadline_client(1.0) as client:
        backend = client._transport._pool._network_backend  # type: ignore[attr-defined]
        assert isinstance(backend, _Backend)

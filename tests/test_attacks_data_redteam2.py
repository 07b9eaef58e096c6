"""Red team, second pass: the data-source fixes (statement timeout per transaction with a
cancelling watchdog, call deadline, token masking, HTTP time/size bounds, dot names) attacked
from a hostile analysis and a hostile data API / S3 server. Every server is on loopback (the
real PostgreSQL on 127.0.0.1, tiny HTTP servers in threads). An attack that still works is a
test asserting the secure behaviour, so it fails until fixed."""

from __future__ import annotations

import contextlib
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from pydantic import SecretStr
from servers.postgres import PostgresServer
from test_attacks_data_redteam import TOKEN, _in_thread, _json, _Server

import flame
from flame.analysis.loader import load_analysis
from flame.clients.token import TokenSource
from flame.config import TokenSettings, load_config
from flame.data import Data
from flame.data.sources.descriptor import resolve_node_file
from flame.data.sources.fhir import FhirSource
from flame.data.sources.http import HttpFileSource
from flame.data.sources.local import LocalSource
from flame.data.sources.sql import SqlSource
from flame.errors import DataError, RunFailed, RunTimeout
from flame.utils.deadline import call_deadline


def _terminate(server: PostgresServer, database: str) -> None:
    """End the source's backends (a query that outlived every bound) so the test can finish."""
    with server.admin() as admin:
        admin.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity "
            "where datname = %s and application_name = 'flame'",
            [database],
        )


# --- SQL: the watchdog and the rollback ------------------------------------------------------
# PL/pgSQL may trap QUERY_CANCELED by name; DO runs in a READ ONLY transaction (it writes
# nothing). The statement timeout fires once per statement and the watchdog cancels once, so
# a block that swallows both keeps the backend (and the source's lock) busy. Bounded at 15 s
# server-side so a failing run still ends.
SWALLOW_CANCEL = (
    "do $$ declare t0 timestamptz := clock_timestamp(); begin "
    "while clock_timestamp() < t0 + interval '15 seconds' loop "
    "begin perform pg_sleep(0.1); exception when query_canceled then null; end; "
    "end loop; end $$"
)


def test_a_do_block_swallowing_the_cancel_cannot_outlive_the_statement_timeout(
    postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    database = postgres_databases()
    source = SqlSource("db", postgres_server.url(database), statement_timeout=1.0)
    try:
        thread, outcome = _in_thread(lambda: source.query(SWALLOW_CANCEL))
        thread.join(6.0)
        still_running = thread.is_alive()
        if still_running:
            _terminate(postgres_server, database)
            thread.join(20.0)
        assert not still_running, "the query ran past its 1 s statement timeout + grace"
        assert isinstance(outcome.get("error"), DataError)
    finally:
        source.close()


def test_a_do_block_swallowing_the_cancel_cannot_outlive_the_call_deadline(
    postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    database = postgres_databases()
    source = SqlSource("db", postgres_server.url(database))  # 300 s statement timeout

    def call() -> object:
        with call_deadline(time.monotonic() + 1.0):
            return source.query(SWALLOW_CANCEL)

    try:
        thread, _outcome = _in_thread(call)
        thread.join(6.0)
        still_running = thread.is_alive()
        if still_running:
            _terminate(postgres_server, database)
            thread.join(20.0)
        assert not still_running, "the query held the node past the epoch's deadline"
    finally:
        source.close()


HOLD_DO = f"""
def analyze(data):
    return {{"n": data.source("db").query({SWALLOW_CANCEL!r}).num_rows}}

def aggregate(results):
    return results
"""


def test_an_isolated_analysis_swallowing_the_cancel_does_not_hold_the_node(
    tmp_path: Path, postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    """Seat: hostile isolated analysis; the node serves its call under call_deadline(2 s
    epoch). Secure: the run ends within a small margin of the deadline."""
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(HOLD_DO))
    functions = load_analysis(path).functions
    source = SqlSource("db", postgres_server.url(postgres_databases()))
    nodes = {"node-0": Data({"db": source}, node_id="node-0")}
    config = load_config(epochs=1).model_copy(
        update={"epoch_timeout": 2.0, "presence_timeout": 1.0}
    )
    started = time.monotonic()
    with pytest.raises((RunFailed, RunTimeout)):
        flame.simulate(
            functions.analyze, functions.aggregate, data=nodes, isolate=True, config=config
        )
    assert time.monotonic() - started < 8.0


def test_a_session_advisory_lock_does_not_survive_the_query(
    postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    """Session-level advisory locks ignore rollback: one analysis could hold them (against
    other clients of the database, or as a channel to the next analysis on the connection)."""
    database = postgres_databases()
    source = SqlSource("db", postgres_server.url(database))
    try:
        source.query("select pg_advisory_lock(917351) is null as locked")
        with postgres_server.admin(database) as admin:
            row = admin.execute(
                "select count(*) from pg_locks where locktype = 'advisory' and objid = 917351"
            ).fetchone()
        assert row is not None and row[0] == 0, "the query's advisory lock outlived it"
    finally:
        source.close()


def test_a_prepared_statement_does_not_survive_the_query(
    postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    """PREPARE is not transactional: state one query leaves for the next on the connection."""
    source = SqlSource("db", postgres_server.url(postgres_databases()))
    try:
        with contextlib.suppress(DataError):
            source.query("prepare flame_left_behind as select 41 + 1 as v")
        with pytest.raises(DataError):
            source.query("execute flame_left_behind")
    finally:
        source.close()


def test_a_cursor_with_hold_or_listen_does_not_survive_the_query(
    postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    source = SqlSource("db", postgres_server.url(postgres_databases()))
    try:
        for sql in ("declare held cursor with hold for select 1 as v", "listen flame_channel"):
            with contextlib.suppress(DataError):
                source.query(sql)
        with pytest.raises(DataError):
            source.query("fetch all from held")
        listening = source.query("select count(*) as n from pg_listening_channels()")
        assert listening.column("n")[0].as_py() == 0
    finally:
        source.close()


# --- HTTP: time bounds before the body ---------------------------------------------------------
class _SlowHeaders:
    """A raw loopback server that sends a status line, then one header byte every 0.3 s."""

    def __init__(self, seconds: float = 20.0) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop_event = threading.Event()
        self.seconds = seconds
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Pad: ")
                end = time.monotonic() + self.seconds
                while time.monotonic() < end and not self.stop_event.wait(0.3):
                    conn.sendall(b"a")

    def stop(self) -> None:
        self.stop_event.set()
        self.listener.close()


def test_slow_headers_cannot_hold_a_file_read_past_the_call_deadline() -> None:
    server = _SlowHeaders()
    source = HttpFileSource("api", f"http://127.0.0.1:{server.port}/files", timeout=1.0, retries=0)

    def call() -> object:
        with call_deadline(time.monotonic() + 2.0):
            return source.open("values.csv")

    try:
        thread, outcome = _in_thread(call)
        thread.join(6.0)
        still_running = thread.is_alive()
        server.stop()
        thread.join(5.0)
        assert not still_running, "headers trickled a byte per 0.3 s held the call past 2 s"
        assert isinstance(outcome.get("error"), DataError)
    finally:
        source.close()


# --- S3: the same bounds as the HTTP file source ----------------------------------------------
def _trickle(request: BaseHTTPRequestHandler) -> None:
    request.send_response(200)
    request.send_header("Content-Length", "100000")
    request.send_header("Content-Type", "application/octet-stream")
    request.end_headers()
    end = time.monotonic() + 20.0
    while time.monotonic() < end:
        request.wfile.write(b"x")
        request.wfile.flush()
        time.sleep(0.2)


def test_an_s3_object_trickled_cannot_hold_the_call_past_its_deadline() -> None:
    pytest.importorskip("minio")
    from flame.clients.minio_connect import make_minio_client
    from flame.data.sources.s3 import S3Source

    server = _Server(_trickle)
    client = make_minio_client(
        server.base.removeprefix("http://"),
        access_key="flame-test-access",
        secret_key="flame-test-secret-key",
        secure=False,
        region="us-east-1",
        timeout=1.0,
        retries=0,
    )
    source = S3Source("bucket", client, "data")

    def call() -> object:
        with call_deadline(time.monotonic() + 2.0):
            return source.open("values.csv")

    try:
        thread, _outcome = _in_thread(call)
        thread.join(6.0)
        still_running = thread.is_alive()
        server.stop()
        assert not still_running, "a byte per 0.2 s held an S3 read past the 2 s deadline"
    finally:
        server.stop()


# --- the token in error text -------------------------------------------------------------------
def _tokens() -> TokenSource:
    return TokenSource(TokenSettings(token=SecretStr(TOKEN)), "data API 'fhir'")


def test_a_token_a_server_puts_in_a_next_link_host_is_masked() -> None:
    """httpx lowercases a host: the exact-match mask misses the token there."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        link = [{"relation": "next", "url": f"http://{TOKEN}.invalid/fhir/Observation"}]
        _json(request, {"resourceType": "Bundle", "entry": [], "link": link})

    server = _Server(handle)
    source = FhirSource("fhir", server.base + "/fhir", _tokens(), timeout=2.0, retries=0)
    try:
        with pytest.raises(DataError, match="another host") as err:
            list(source.search("Observation"))
        assert TOKEN.lower() not in str(err.value).lower()
    finally:
        source.close()
        server.stop()


HOST_STEAL = """
def analyze(data):
    try:
        list(data.source("fhir").search("Observation"))
    except Exception as exc:
        return {"got": str(exc)}
    return {"got": ""}

def aggregate(results):
    return results
"""


def test_the_isolated_analysis_does_not_get_the_token_from_a_next_link_host(
    tmp_path: Path,
) -> None:
    """Seats together: a server that puts the token in a next link's host, an analysis that
    reads the error. Secure: no spelling of the token in what leaves the child."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        link = [{"relation": "next", "url": f"http://{TOKEN}.invalid/fhir/Observation"}]
        _json(request, {"resourceType": "Bundle", "entry": [], "link": link})

    server = _Server(handle)
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(HOST_STEAL))
    functions = load_analysis(path).functions
    source = FhirSource("fhir", server.base + "/fhir", _tokens(), timeout=2.0, retries=0)
    nodes = {"node-0": Data({"fhir": source}, node_id="node-0")}
    try:
        result = flame.simulate(functions.analyze, functions.aggregate, data=nodes, isolate=True)
    finally:
        server.stop()
    text = repr(getattr(result, "value", result))
    assert "another host" in text  # the analysis did get the error
    assert TOKEN.lower() not in text.lower()


def test_a_token_prefix_in_an_operation_outcome_is_masked() -> None:
    """Servers often name the start of a rejected token; a 20-character prefix is most of it."""
    prefix = TOKEN[:20]

    def handle(request: BaseHTTPRequestHandler) -> None:
        outcome = {"resourceType": "OperationOutcome", "issue": [{"diagnostics": f"bad {prefix}"}]}
        _json(request, outcome, status=403)

    server = _Server(handle)
    source = FhirSource("fhir", server.base + "/fhir", _tokens(), timeout=2.0, retries=0)
    try:
        with pytest.raises(DataError, match="403") as err:
            list(source.search("Observation"))
        assert prefix not in str(err.value)
    finally:
        source.close()
        server.stop()


def test_the_token_in_a_redirect_location_stays_out_of_the_error() -> None:
    def handle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(302)
        request.send_header("Location", f"/fhir/Observation?access_token={TOKEN}")
        request.send_header("Content-Length", "0")
        request.end_headers()

    server = _Server(handle)
    source = FhirSource("fhir", server.base + "/fhir", _tokens(), timeout=2.0, retries=0)
    try:
        with pytest.raises(DataError, match="302") as err:
            list(source.search("Observation"))
        assert TOKEN not in str(err.value)
    finally:
        source.close()
        server.stop()


def test_a_url_encoded_token_in_a_next_link_path_is_masked() -> None:
    """httpx.URL.path decodes %-escapes, so the encoded token is masked as the plain one."""
    encoded = "".join(f"%{b:02X}" for b in TOKEN.encode())
    base: list[str] = []

    def handle(request: BaseHTTPRequestHandler) -> None:
        if "%" in request.path:
            _json(request, {"resourceType": "OperationOutcome"}, status=404)
            return
        link = [{"relation": "next", "url": f"{base[0]}/fhir/{encoded}"}]
        _json(request, {"resourceType": "Bundle", "entry": [], "link": link})

    server = _Server(handle)
    base.append(server.base)
    source = FhirSource("fhir", server.base + "/fhir", _tokens(), timeout=2.0, retries=0)
    try:
        with pytest.raises(DataError, match="404") as err:
            list(source.search("Observation"))
        assert TOKEN not in str(err.value) and encoded not in str(err.value)
    finally:
        source.close()
        server.stop()


# --- dot names ---------------------------------------------------------------------------------
@pytest.fixture
def dot_folder(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "v.csv").write_text("v\n1\n")
    (tmp_path / ".env").write_text("SECRET=1\n")
    (tmp_path / "a" / ".hidden").write_text("h\n")
    yield tmp_path


@pytest.mark.parametrize(
    "name",
    ["./.env", ".env/", "a/../.env", "a/./.hidden", "a//.hidden", "./a/.hidden/", ".", "a/.."],
)
def test_dot_name_spellings_are_refused(dot_folder: Path, name: str) -> None:
    with pytest.raises(DataError):
        LocalSource(dot_folder).open(name)
    with pytest.raises(DataError):
        resolve_node_file(dot_folder, name)


SWALLOW_FUNCTION = (
    "create function swallow() returns int language plpgsql as $$ "
    "declare t0 timestamptz := clock_timestamp(); begin "
    "while clock_timestamp() < t0 + interval '15 seconds' loop "
    "begin perform pg_sleep(0.1); exception when query_canceled then null; end; "
    "end loop; return 1; end $$; grant execute on function swallow() to public"
)


def test_a_select_of_a_function_swallowing_the_cancel_has_its_connection_ended(
    postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    """DO is refused, but a function the database already has can trap the cancel too: the
    watchdog then shuts the socket and terminates the backend."""
    database = postgres_databases()
    postgres_server.execute(database, SWALLOW_FUNCTION)
    source = SqlSource("db", postgres_server.url(database), statement_timeout=1.0)
    try:
        started = time.monotonic()
        thread, outcome = _in_thread(lambda: source.query("select swallow() as v"))
        thread.join(8.0)
        still_running = thread.is_alive()
        if still_running:
            _terminate(postgres_server, database)
            thread.join(20.0)
        assert not still_running, "the query ran past its statement timeout and the cancel"
        assert isinstance(outcome.get("error"), DataError)
        assert "ignored the cancel" in str(outcome["error"])
        assert time.monotonic() - started < 8.0
        with postgres_server.admin(database) as admin:  # the backend is gone, not just the socket
            row = admin.execute(
                "select count(*) from pg_stat_activity where query like 'select swallow()%'"
            ).fetchone()
        assert row is not None and row[0] == 0
        assert source.query("select 1 as ok").num_rows == 1  # usable again: a new connection
    finally:
        source.close()


@pytest.mark.parametrize(
    ("diagnostics", "shown"),
    [(f"unknown parameter near {TOKEN[5:13]}", False), ("unknown parameter 'foo'", True)],
)
def test_a_diagnostic_sharing_eight_characters_with_the_token_is_dropped(
    diagnostics: str, shown: bool
) -> None:
    def handle(request: BaseHTTPRequestHandler) -> None:
        outcome = {"resourceType": "OperationOutcome", "issue": [{"diagnostics": diagnostics}]}
        _json(request, outcome, status=400)

    server = _Server(handle)
    source = FhirSource("fhir", server.base + "/fhir", _tokens(), timeout=2.0, retries=0)
    try:
        with pytest.raises(DataError, match="400") as err:
            list(source.search("Observation"))
        assert (diagnostics in str(err.value)) is shown
        assert TOKEN[5:13] not in str(err.value)
    finally:
        source.close()
        server.stop()


def test_a_token_prefix_as_the_resource_type_is_not_echoed() -> None:
    prefix = TOKEN[:20]

    def handle(request: BaseHTTPRequestHandler) -> None:
        _json(request, {"resourceType": prefix})

    server = _Server(handle)
    source = FhirSource("fhir", server.base + "/fhir", _tokens(), timeout=2.0, retries=0)
    try:
        with pytest.raises(DataError, match="expected a FHIR Bundle") as err:
            list(source.search("Observation"))
        assert prefix.lower() not in str(err.value).lower()
    finally:
        source.close()
        server.stop()

"""Red team: a hostile analysis and a hostile (or broken) data source against the node's
data sources (docs/how-to/data-sources.md, docs/threat-model.md).

Claims attacked: "SQL sources run every statement ... under the statement timeout"; "every
call has a timeout"; a FHIR search stops "instead of paging forever"; "errors name the source,
the URL path and the status; the bearer token is never logged or put in a message". Servers
are real ones on loopback (PostgreSQL on 127.0.0.1, a tiny HTTP server in a thread); nothing
leaves the machine (a redirect's Location names a documentation address that is never
contacted: redirects are not followed).
"""

from __future__ import annotations

import contextlib
import json
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from servers.postgres import PostgresServer

import flame
from flame.analysis.loader import load_analysis
from flame.clients.token import TokenSource
from flame.config import TokenSettings, load_config
from flame.data import Data
from flame.data.sources.descriptor import reachable
from flame.data.sources.fhir import FhirSource
from flame.data.sources.http import HttpFileSource
from flame.data.sources.local import LocalSource
from flame.data.sources.sql import SqlSource
from flame.data.versions import DataVersions
from flame.errors import DataError, RunFailed, RunTimeout

TOKEN = "tok-Zq8vR2mXw7Lp4Nc9Hs6Jd3Kb"  # long and random-looking: cannot match a port or time


# --- a scriptable HTTP server on loopback --------------------------------------------------
class _Server:
    """One ThreadingHTTPServer on 127.0.0.1 whose GET answers `handler(request)`."""

    def __init__(self, handle: Callable[[BaseHTTPRequestHandler], None]) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _json(request: BaseHTTPRequestHandler, body: Any, status: int = 200) -> None:
    data = json.dumps(body).encode()
    request.send_response(status)
    request.send_header("Content-Type", "application/fhir+json")
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    request.wfile.write(data)


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            outcome["value"] = call()
        except BaseException as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# --- SQL: the statement timeout ------------------------------------------------------------
def test_analysis_cannot_switch_off_the_sql_statement_timeout(
    postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    """Seat: hostile analysis. `set_config(..., false)` is a SELECT, allowed in a READ ONLY
    transaction, and session-level: it outlives the transaction, so every later query of the
    node's pooled connection runs without the configured statement timeout (then a
    `pg_sleep` holds the node runtime's request loop, which serves source calls
    synchronously, past the epoch deadline)."""
    source = SqlSource("db", postgres_server.url(postgres_databases()), statement_timeout=0.5)
    try:
        with pytest.raises(DataError, match="statement timeout"):  # the control: it works
            source.query("select pg_sleep(3) as s")
        source.query("select set_config('statement_timeout', '0', false) as t")
        started = time.monotonic()
        with pytest.raises(DataError, match="statement timeout"):
            source.query("select pg_sleep(3) as s")
        assert time.monotonic() - started < 2.0
    finally:
        source.close()


def test_analysis_cannot_switch_off_the_sql_statement_timeout_with_set(
    postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    """The same through the non-cursor path: `SET` is refused by DECLARE CURSOR, so it runs
    as a prepared statement in a READ ONLY transaction, which allows SET."""
    source = SqlSource("db", postgres_server.url(postgres_databases()), statement_timeout=0.5)
    try:
        source.query("set statement_timeout = 0")
        with pytest.raises(DataError, match="statement timeout"):
            source.query("select pg_sleep(3) as s")
    finally:
        source.close()


UNTIMED = """
def analyze(data):
    db = data.source("db")
    db.query("select set_config('statement_timeout', '0', false) as t")
    return {"slept": db.query("select pg_sleep(3)::text as s").num_rows}

def aggregate(results):
    return results
"""


def test_isolated_analysis_cannot_switch_off_the_sql_statement_timeout(
    tmp_path: Path, postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    """End to end as on a node: the analysis in its confined child, the source in the
    runtime. The secure outcome is a failed run naming the statement timeout."""
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(UNTIMED))
    functions = load_analysis(path).functions
    url = postgres_server.url(postgres_databases())
    source = SqlSource("db", url, statement_timeout=0.5)
    nodes = {"node-0": Data({"db": source}, node_id="node-0")}
    with pytest.raises(RunFailed, match="statement timeout"):
        flame.simulate(functions.analyze, functions.aggregate, data=nodes, isolate=True)


HOLD = """
def analyze(data):
    return {"n": data.source("db").query("select pg_sleep(12)::text as s").num_rows}

def aggregate(results):
    return results
"""


def test_a_slow_source_call_does_not_hold_the_node_past_the_epoch_deadline(
    tmp_path: Path, postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    """Seat: hostile analysis, default statement timeout (300 s). The runtime serves the
    child's `source_call` synchronously (isolation/runner.py `_serve` -> `_source_call`),
    so the deadline and the abort watch (`on_wait`) are only looked at between calls: a
    12 s query holds the node (and keeps the child alive) 10 s past a 2 s epoch. Measured:
    the run's RunTimeout came at 2 s, `simulate` returned after 12.4 s. Secure: the node is
    free within a small margin of its deadline."""
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(HOLD))
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


def test_multiple_statements_with_a_set_are_still_refused(
    postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    """Refused: a SET smuggled behind a SELECT in one string (several statements)."""
    source = SqlSource("db", postgres_server.url(postgres_databases()), statement_timeout=0.5)
    try:
        with pytest.raises(DataError):
            source.query("select 1 as a; set statement_timeout = 0")
        with pytest.raises(DataError, match="statement timeout"):
            source.query("select pg_sleep(3) as s")
    finally:
        source.close()


@pytest.mark.parametrize(
    "value",
    ["' or '1'='1", "x'); select pg_sleep(5); --", "%s %(x)s ? $$ ' \\' \"", "a' union select 'b"],
)
def test_query_params_stay_values_not_sql(
    value: str, postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    """Refused: a param crafted as SQL (quotes, `%`-style and `?` marks, a dollar quote) is
    bound as a value through the `?` rewrite; it neither widens the match nor runs."""
    database = postgres_databases()
    postgres_server.execute(database, "create table t (v text); insert into t values ('a')")
    source = SqlSource("db", postgres_server.url(database), statement_timeout=2.0)
    try:
        started = time.monotonic()
        table = source.query("select count(*) as n, ? as echo from t where v = ?", [value, value])
        assert table.column("n")[0].as_py() == 0
        assert table.column("echo")[0].as_py() == value
        assert time.monotonic() - started < 2.0
    finally:
        source.close()


# --- FHIR: paging -------------------------------------------------------------------------
@pytest.fixture
def endless_fhir() -> Iterator[tuple[_Server, dict[str, int]]]:
    """A FHIR server whose every page links to a new, never-seen next page."""
    state = {"pages": 0, "stop": 0}

    def handle(request: BaseHTTPRequestHandler) -> None:
        state["pages"] += 1
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "entry": [{"resource": {"resourceType": "Observation", "id": str(state["pages"])}}],
        }
        if not state["stop"]:
            page = f"{server.base}/fhir/Observation?page={state['pages']}"
            bundle["link"] = [{"relation": "next", "url": page}]
        _json(request, bundle)

    server = _Server(handle)
    try:
        yield server, state
    finally:
        state["stop"] = 1
        server.stop()


def test_a_fhir_server_with_endless_fresh_next_links_is_not_paged_forever(
    endless_fhir: tuple[_Server, dict[str, int]],
) -> None:
    """Seat: hostile data source. The loop guard only catches a *repeated* URL; a server that
    mints a new next link per page keeps `search` (and the runtime serving the child's
    `source_call`, which materialises the whole list) busy and growing without end. Secure:
    a DataError within a bounded number of pages or time."""
    server, state = endless_fhir
    # max_pages given: the default cap (10,000 pages) is far past this loopback server's
    # rate (~23 pages/s measured: 8 s is ~180 pages); a node's epoch deadline bounds the
    # search sooner (test_a_search_served_for_the_analysis_ends_at_the_call_deadline)
    source = FhirSource("fhir", server.base + "/fhir", timeout=2.0, retries=0, max_pages=100)
    thread, outcome = _in_thread(lambda: sum(1 for _ in source.search("Observation")))
    thread.join(8.0)
    still_paging = thread.is_alive()
    pages = state["pages"]
    state["stop"] = 1  # let the search end so the test does not leak a busy thread
    thread.join(10.0)
    source.close()
    assert not still_paging, f"still paging after 8 s ({pages} pages fetched)"
    assert isinstance(outcome.get("error"), DataError)
    assert "'fhir'" in str(outcome["error"]) and "max_pages" in str(outcome["error"])


def test_a_fhir_next_link_looping_back_to_an_earlier_page_stops() -> None:
    """Refused: a next link that repeats an earlier one (A -> B -> A) ends the search."""
    base: list[str] = []

    def handle(request: BaseHTTPRequestHandler) -> None:
        page = "b" if "page=a" in request.path else "a"
        link = [{"relation": "next", "url": f"{base[0]}/fhir/Observation?page={page}"}]
        _json(request, {"resourceType": "Bundle", "entry": [], "link": link})

    loop = _Server(handle)
    base.append(loop.base)
    source = FhirSource("fhir", loop.base + "/fhir", timeout=2.0, retries=0)
    try:
        with pytest.raises(DataError, match="repeats"):
            list(source.search("Observation"))
    finally:
        source.close()
        loop.stop()


def test_a_fhir_next_link_to_another_port_of_the_same_host_is_refused() -> None:
    """Refused: another origin on loopback (same host, other port) gets no request and no
    token."""
    other_hits: list[str] = []
    other = _Server(
        lambda request: (
            other_hits.append(request.headers.get("Authorization") or ""),
            _json(request, {"resourceType": "Bundle"}),
        )
    )
    home = _Server(
        lambda request: _json(
            request,
            {
                "resourceType": "Bundle",
                "entry": [],
                "link": [{"relation": "next", "url": f"{other.base}/fhir/Observation?p=1"}],
            },
        )
    )
    try:
        source = FhirSource("fhir", home.base + "/fhir", timeout=2.0, retries=0)
        with pytest.raises(DataError, match="another host"):
            list(source.search("Observation"))
        assert other_hits == []
    finally:
        home.stop()
        other.stop()


# --- HTTP: timeouts and error text ----------------------------------------------------------
def test_a_trickling_data_api_cannot_hold_a_file_read_past_its_timeout() -> None:
    """Seat: hostile/broken data API. httpx's timeout is per socket read, so a server that
    sends one byte every 0.3 s never trips a 1 s timeout: `open()` takes as long as the
    server likes ("every call has a timeout" does not hold for the call as a whole).
    Secure: the read fails within a small multiple of the configured timeout."""
    stop = threading.Event()

    def handle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", "1000")
        request.end_headers()
        for _ in range(1000):
            if stop.wait(0.3):
                return
            request.wfile.write(b"x")
            request.wfile.flush()

    server = _Server(handle)
    source = HttpFileSource("api", server.base + "/files", timeout=1.0, retries=0)
    thread, outcome = _in_thread(lambda: source.open("values.csv").read())
    thread.join(6.0)
    still_reading = thread.is_alive()
    stop.set()
    thread.join(5.0)
    source.close()
    server.stop()
    assert not still_reading, "open() still reading 6 s after a 1 s timeout"
    assert isinstance(outcome.get("error"), DataError)


def test_a_redirect_is_not_read_as_the_files_content() -> None:
    """Seat: hostile/broken data API. Redirects are not followed (good), but any status below
    400 is returned as the answer, so a 302's body becomes the file's bytes, silently.
    Secure: a DataError naming the status."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        body = b"value\n999\n"
        request.send_response(302)
        request.send_header("Location", "http://192.0.2.1/values.csv")  # never contacted
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    server = _Server(handle)
    source = HttpFileSource("api", server.base + "/files", timeout=2.0, retries=0)
    try:
        with pytest.raises(DataError, match="302"):
            source.open("values.csv").read()
    finally:
        source.close()
        server.stop()


def test_the_token_echoed_in_a_reason_phrase_stays_out_of_the_error() -> None:
    """Seat: hostile/broken data API. The error text carries the server's reason phrase
    unredacted; one that echoes the bearer token puts it in the DataError (which reaches
    the analysis child and the failure reason). Secure: the token is redacted."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        auth = request.headers.get("Authorization") or ""
        request.send_response(400, f"Bad {auth}")
        request.send_header("Content-Length", "0")
        request.end_headers()

    server = _Server(handle)

    tokens = TokenSource(TokenSettings(token=SecretStr(TOKEN)), "data API 'api'")

    source = HttpFileSource("api", server.base + "/files", tokens, timeout=2.0, retries=0)
    try:
        with pytest.raises(DataError) as err:
            source.open("values.csv")
        assert "HTTP 400" in str(err.value)
        assert TOKEN not in str(err.value)
    finally:
        source.close()
        server.stop()


def test_the_token_echoed_in_a_5xx_reason_phrase_stays_out_of_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The retry warning logs the reason phrase too (`_HttpService._request`, `problem`)."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(503, f"Busy {request.headers.get('Authorization') or ''}")
        request.send_header("Content-Length", "0")
        request.end_headers()

    server = _Server(handle)

    tokens = TokenSource(TokenSettings(token=SecretStr(TOKEN)), "data API 'api'")

    source = HttpFileSource(
        "api",
        server.base + "/files",
        tokens,
        timeout=2.0,
        retries=1,
        backoff=0.01,
    )
    try:
        with caplog.at_level("DEBUG"), pytest.raises(DataError) as err:
            source.open("values.csv")
        flames = [r.getMessage() for r in caplog.records if r.name.startswith("flame")]
        assert any("503" in line for line in flames)  # the retry warning was logged
        assert not [line for line in flames if TOKEN in line]
        assert TOKEN not in str(err.value)
    finally:
        source.close()
        server.stop()


# --- local folder: what the fingerprint covers ---------------------------------------------
def test_a_dot_file_the_analysis_can_read_is_in_the_data_version(tmp_path: Path) -> None:
    """Seat: hostile analysis (reads a file by name) plus a file changing mid-run. Files whose
    path has a dot part are left out of `files()` and therefore of the fingerprint
    (`DataVersions.take`), but `resolve_node_file` (the one path check) still hands them to
    the analysis by name. So an analysis reading `.late.csv` computes on data that changes
    between epochs with no "changed during the run" failure. Secure: either the name is
    refused, or the file is fingerprinted and its change is an error naming it."""
    (tmp_path / "values.csv").write_text("v\n1\n")
    (tmp_path / ".late.csv").write_text("v\n2\n")
    source = LocalSource(tmp_path, "local")
    versions = DataVersions.take({"local": source})
    (tmp_path / ".late.csv").write_text("v\n3\n4\n")
    readable = reachable(tmp_path, ".late.csv")
    try:
        versions.check()
        noticed = False
    except DataError as exc:
        noticed = ".late.csv" in str(exc)
    assert not readable or noticed, "readable by name, changed mid-run, change not noticed"


def test_a_file_past_the_first_ten_thousand_is_in_the_data_version(tmp_path: Path) -> None:
    """Seat: a node folder of many small files (one per patient is common). `DataVersions`
    fingerprints the first 10,000 names only and then also skips the "appeared" check
    (versions.py `_MAX_FILES`), so a rewrite of a later file, which the analysis reads as any
    other, fails nothing (docs/faults.md: "a data file replaced mid-run: the epoch fails
    naming the source and the file"; the limit is in no document)."""
    for i in range(10_001):
        (tmp_path / f"p{i:05d}.csv").write_text("v\n1\n")
    versions = DataVersions.take({"local": LocalSource(tmp_path, "local")})
    (tmp_path / "p10000.csv").write_text("v\n2\n3\n")
    with pytest.raises(DataError, match=r"p10000\.csv"):
        versions.check()


def test_a_deeply_nested_json_answer_is_a_data_error_naming_the_source() -> None:
    """Seat: hostile/broken data API. `_HttpService._json` turns ValueError into a DataError,
    but json's RecursionError (100,000 nested arrays, 200 kB) escapes as it is: no source,
    no path, and in the runtime's `_serve` (which catches FlameError, OSError, TypeError,
    ValueError, KeyError) not a reply to the child but an exception out of the request
    loop. Secure: a DataError naming the source."""
    body = b"[" * 100_000 + b"]" * 100_000

    def handle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Type", "application/fhir+json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    server = _Server(handle)
    source = FhirSource("fhir", server.base + "/fhir", timeout=5.0, retries=0)
    try:
        with pytest.raises(DataError, match="'fhir'"):
            list(source.search("Observation"))
    finally:
        source.close()
        server.stop()


STEAL = """
def analyze(data):
    try:
        data.read_bytes("values.csv", source="api")
    except Exception as exc:
        return {"got": str(exc)}
    return {"got": ""}

def aggregate(results):
    return results
"""


def test_the_isolated_analysis_does_not_get_the_data_api_token_from_an_error(
    tmp_path: Path,
) -> None:
    """Seats together: a data API that echoes the Authorization header in its reason phrase
    (a debug proxy does) and an analysis that reads the error. The runtime's reply to the
    child (`ChildRunner._serve`) is `str(exc)` unredacted, so the token of a mounted
    `token_file` (which `FlameConfig.secrets()` does not list, so no log redaction either)
    reaches the confined child, which returns it. Secure: no token in what leaves."""
    token_file = tmp_path / "api.token"
    token_file.write_text(TOKEN)

    def handle(request: BaseHTTPRequestHandler) -> None:
        if request.path.endswith("/files/"):  # the listing (probed at start) works
            _json(request, ["values.csv"])
            return
        request.send_response(400, f"Bad {request.headers.get('Authorization') or ''}")
        request.send_header("Content-Length", "0")
        request.end_headers()

    server = _Server(handle)
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(STEAL))
    functions = load_analysis(path).functions
    tokens = TokenSource(TokenSettings(token_file=token_file), "data API 'api'")
    source = HttpFileSource("api", server.base + "/files", tokens, timeout=2.0, retries=0)
    nodes = {"node-0": Data({"api": source}, node_id="node-0")}
    try:
        result = flame.simulate(functions.analyze, functions.aggregate, data=nodes, isolate=True)
    finally:
        server.stop()
    text = repr(getattr(result, "value", result))
    assert "HTTP 400" in text  # the analysis did get the error
    assert TOKEN not in text

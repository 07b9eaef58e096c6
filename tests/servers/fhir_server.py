"""A real HTTP data API for tests and benchmarks: FHIR search with paging, files, a JWKS.

It runs `http.server.ThreadingHTTPServer` (HTTP/1.1, keep-alive) in a thread on 127.0.0.1.
Paths:

* `GET /fhir/{Type}?_count=N&subject=...&code=...` -> searchset Bundle; `next` links are
  HAPI-style (`/fhir?_getpages=ID&_getpagesoffset=K&_count=N`), so a client must follow the
  link it was given rather than rebuild URLs. `_summary=count` returns only the total.
* `GET /files/` -> JSON list of file names; `GET /files/{name}` -> the bytes.
* `GET /.well-known/jwks.json` -> `server.jwks` (no auth).

Every `/fhir` and `/files` request needs `Authorization: Bearer {server.token}` (when a
token is set), else 401 with an OperationOutcome. Faults are injected by path prefix with
`add_fault()`: an error status (optionally with Retry-After), a delay, or a truncated body.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

TEST_FILES: dict[str, bytes] = {
    "cohort.csv": b"age,weight\n34,70.5\n51,82.0\n47,\n",
    "notes/readme.txt": "hello from the data API \u2713\n".encode(),
    "dir with space/r\u00e9sum\u00e9.txt": b"unicode and spaces in names\n",
    "large.bin": bytes(range(256)) * (12 * 1024 * 4),  # 12 MiB
}
"""The files the session data API serves (names with spaces and non-ASCII on purpose)."""

LOINC_WEIGHT = "29463-7"
LOINC_HEIGHT = "8302-2"


@dataclass
class Fault:
    """What to do to the next `times` requests whose path starts with `prefix`."""

    prefix: str
    status: int | None = 503
    times: int = 1
    retry_after: str | None = None
    delay: float = 0.0
    truncate: bool = False


@dataclass
class SeenRequest:
    method: str
    path: str
    query: str
    authorized: bool
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)


def make_patients(count: int) -> list[dict[str, Any]]:
    return [
        {
            "resourceType": "Patient",
            "id": f"p{i}",
            "gender": "female" if i % 2 else "male",
            "birthDate": f"{1940 + i % 60}-0{1 + i % 9}-1{i % 10}",
        }
        for i in range(count)
    ]


def observation_value(i: int) -> float | None:
    """The deterministic value of observation i; every 13th has none (a missing value)."""
    if i % 13 == 5:
        return None
    return round(40.0 + ((i * 7919) % 6000) / 100.0, 2)


def make_observations(count: int, patients: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(count):
        code = LOINC_WEIGHT if i % 3 else LOINC_HEIGHT
        resource: dict[str, Any] = {
            "resourceType": "Observation",
            "id": f"o{i}",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "subject": {"reference": f"Patient/p{i % max(patients, 1)}"},
        }
        value = observation_value(i)
        if value is None:
            resource["dataAbsentReason"] = {"text": "not measured"}
        else:
            resource["valueQuantity"] = {
                "value": value,
                "unit": "kg" if code == LOINC_WEIGHT else "cm",
            }
        out.append(resource)
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: DataApiServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    # -- plumbing ---------------------------------------------------------------------------

    def _send(
        self,
        status: int,
        body: bytes | memoryview,
        content_type: str = "application/fhir+json",
        extra: dict[str, str] | None = None,
        truncate: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if truncate:
            self.send_header("Connection", "close")
        self.end_headers()
        view = memoryview(body)
        if truncate:
            self.wfile.write(view[: len(view) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        for start in range(0, len(view), 1 << 20):
            self.wfile.write(view[start : start + (1 << 20)])

    def _json(self, status: int, value: Any, **kw: Any) -> None:
        self._send(status, json.dumps(value, separators=(",", ":")).encode(), **kw)

    def _outcome(self, status: int, code: str, text: str, **kw: Any) -> None:
        self._json(
            status,
            {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": code, "diagnostics": text}],
            },
            **kw,
        )

    # -- dispatch ---------------------------------------------------------------------------

    def do_GET(self) -> None:
        api = self.server.api
        parts = urlsplit(self.path)
        path = parts.path
        auth = self.headers.get("Authorization", "")
        authorized = api.token is None or auth == f"Bearer {api.token}"
        record = SeenRequest("GET", path, parts.query, authorized, headers=dict(self.headers))
        api._record(record)
        try:
            self._dispatch(api, path, parse_qs(parts.query), authorized, record)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _dispatch(
        self,
        api: DataApiServer,
        path: str,
        query: dict[str, list[str]],
        authorized: bool,
        record: SeenRequest,
    ) -> None:
        fault = api._take_fault(path)
        truncate = False
        if fault is not None:
            if fault.delay and api._stopping.wait(fault.delay):
                return
            if fault.status is not None:
                record.status = fault.status
                extra = {"Retry-After": fault.retry_after} if fault.retry_after else None
                self._outcome(fault.status, "transient", "injected fault", extra=extra)
                return
            truncate = fault.truncate
        if path == "/.well-known/jwks.json":
            record.status = 200
            self._json(200, api.jwks, content_type="application/json")
            return
        if not (path.startswith("/fhir") or path.startswith("/files/")):
            record.status = 404
            self._outcome(404, "not-found", f"no route {path}")
            return
        if not authorized:
            record.status = 401
            self._outcome(
                401,
                "login",
                "invalid or missing bearer token",
                extra={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
            return
        if path.startswith("/files/"):
            self._files(api, unquote(path[len("/files/") :]), record, truncate)
        else:
            self._fhir(api, path, query, record)

    def _files(self, api: DataApiServer, name: str, record: SeenRequest, truncate: bool) -> None:
        if name == "":
            record.status = 200
            self._json(200, sorted(api.files), content_type="application/json")
            return
        data = api.files.get(name)
        if data is None:
            record.status = 404
            self._outcome(404, "not-found", f"no file {name}")
            return
        record.status = 200
        self._send(200, data, content_type="application/octet-stream", truncate=truncate)

    def _fhir(
        self, api: DataApiServer, path: str, query: dict[str, list[str]], record: SeenRequest
    ) -> None:
        def first(name: str) -> str | None:
            values = query.get(name)
            return values[0] if values else None

        count = int(first("_count") or api.default_page_size)
        count = max(1, min(count, api.max_page_size))
        if path in ("/fhir", "/fhir/") and first("_getpages"):
            search_id = first("_getpages") or ""
            offset = int(first("_getpagesoffset") or 0)
            found = api._searches.get(search_id)
            if found is None:
                record.status = 410
                self._outcome(410, "not-found", "search expired")
                return
            resource_type, matches = found
        else:
            resource_type = path[len("/fhir/") :]
            resources = api.resources.get(resource_type)
            if resources is None:
                record.status = 404
                self._outcome(404, "not-supported", f"unknown resource type {resource_type}")
                return
            matches = api._match(resources, first("subject"), first("code"))
            offset = 0
            if first("_summary") == "count":
                record.status = 200
                self._json(
                    200, {"resourceType": "Bundle", "type": "searchset", "total": len(matches)}
                )
                return
            search_id = api._new_search(resource_type, matches)
        page = matches[offset : offset + count]
        resources = api.resources[resource_type]
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(matches),
            "link": [{"relation": "self", "url": f"{api.url}{self.path}"}],
            "entry": [
                {
                    "fullUrl": f"{api.url}/fhir/{resource_type}/{resources[i]['id']}",
                    "resource": resources[i],
                    "search": {"mode": "match"},
                }
                for i in page
            ],
        }
        if offset + count < len(matches):
            bundle["link"].append(
                {
                    "relation": "next",
                    "url": f"{api.url}/fhir?_getpages={search_id}"
                    f"&_getpagesoffset={offset + count}&_count={count}",
                }
            )
        record.status = 200
        self._json(200, bundle)


class DataApiServer:
    """The test data API; see the module docstring for what it serves."""

    def __init__(
        self,
        *,
        token: str | None = "flame-test-token",
        patients: int = 25,
        observations: int = 260,
        files: dict[str, bytes] | None = None,
        default_page_size: int = 50,
        max_page_size: int = 1000,
    ) -> None:
        self.token = token
        self.default_page_size = default_page_size
        self.max_page_size = max_page_size
        self.resources: dict[str, list[dict[str, Any]]] = {
            "Patient": make_patients(patients),
            "Observation": make_observations(observations, patients),
        }
        self.files: dict[str, bytes] = dict(files or {})
        self.jwks: dict[str, Any] = {"keys": []}
        self.requests: list[SeenRequest] = []
        self._faults: list[Fault] = []
        self._searches: dict[str, tuple[str, list[int]]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> DataApiServer:
        self._stopping.clear()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.api = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> DataApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fhir_url(self) -> str:
        return f"{self.url}/fhir"

    @property
    def files_url(self) -> str:
        return f"{self.url}/files/"

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/.well-known/jwks.json"

    # -- control ----------------------------------------------------------------------------

    def add_fault(
        self,
        prefix: str,
        status: int | None = 503,
        *,
        times: int = 1,
        retry_after: str | None = None,
        delay: float = 0.0,
        truncate: bool = False,
    ) -> Fault:
        fault = Fault(prefix, status, times, retry_after, delay, truncate)
        with self._lock:
            self._faults.append(fault)
        return fault

    def reset(self) -> None:
        """Drop faults, the request log and stored searches (between tests)."""
        with self._lock:
            self._faults.clear()
            self.requests.clear()
            self._searches.clear()

    def requests_to(self, prefix: str) -> list[SeenRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith(prefix)]

    # -- internals used by the handler ------------------------------------------------------

    def _record(self, request: SeenRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.times > 0 and path.startswith(fault.prefix):
                    fault.times -= 1
                    return fault
        return None

    def _new_search(self, resource_type: str, matches: list[int]) -> str:
        search_id = f"s{next(self._ids)}"
        with self._lock:
            self._searches[search_id] = (resource_type, matches)
        return search_id

    @staticmethod
    def _match(resources: list[dict[str, Any]], subject: str | None, code: str | None) -> list[int]:
        found: list[int] = []
        for index, resource in enumerate(resources):
            if subject is not None and resource.get("subject", {}).get("reference") != subject:
                continue
            if code is not None:
                codes = [c.get("code") for c in resource.get("code", {}).get("coding", [])]
                if code not in codes:
                    continue
            found.append(index)
        return found


def main() -> None:
    """Serve from a separate process (benchmarks): prints the base URL, runs until stdin closes."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--observations", type=int, default=10_000)
    parser.add_argument("--token", default="flame-test-token")
    args = parser.parse_args()
    server = DataApiServer(
        token=args.token, patients=args.patients, observations=args.observations
    ).start()
    print(server.url, flush=True)
    try:
        sys.stdin.read()
    finally:
        server.stop()


if __name__ == "__main__":
    main()

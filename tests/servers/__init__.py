"""Real servers for tests and benchmarks: a FHIR / file data API over HTTP and an S3 server.

They run in threads on 127.0.0.1 with a free port, so tests exercise real sockets, real
HTTP and real S3 signing instead of request-level mocks. `plugin.py` wraps them as pytest
fixtures.
"""

from __future__ import annotations

from servers.fhir_server import DataApiServer, Fault
from servers.s3_server import S3Server, free_port

__all__ = ["DataApiServer", "Fault", "S3Server", "free_port"]

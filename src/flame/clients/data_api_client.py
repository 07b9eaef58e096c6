"""Moved: the data sources live in `flame.data.sources` (one module per kind). Kept for imports."""

from __future__ import annotations

from flame.data.sources import open_source, open_sources, probe_sources
from flame.data.sources._http import DEFAULT_SPOOL_THRESHOLD, HttpStatusError, Params
from flame.data.sources.fhir import FhirSource
from flame.data.sources.http import HttpFileSource
from flame.data.sources.s3 import S3Source

__all__ = [
    "DEFAULT_SPOOL_THRESHOLD",
    "FhirSource",
    "HttpFileSource",
    "HttpStatusError",
    "Params",
    "S3Source",
    "open_source",
    "open_sources",
    "probe_sources",
]

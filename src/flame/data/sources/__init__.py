"""A node's data sources, one module per kind, behind one protocol (`flame.data.sources.base`).

| kind  | module                   | what it serves                                  |
|-------|--------------------------|-------------------------------------------------|
| local | `flame.data.sources.local`    | files in a folder on the node                   |
| http  | `flame.data.sources.http`     | files from an HTTP data API                     |
| fhir  | `flame.data.sources.fhir`     | FHIR R4 search (resources, or columns)          |
| s3    | `flame.data.sources.s3`       | objects under a bucket prefix                   |
| sql   | `flame.data.sources.sql`      | PostgreSQL queries streamed into Arrow          |
| duckdb| `flame.data.sources.duckdb`   | SQL over the node's own files (`data.sql(...)`) |

Kinds are imported when first used, so a node without PostgreSQL never imports psycopg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from flame.data.sources.base import FileSource, Source, safe_relative
from flame.data.sources.local import LocalSource, MemorySource
from flame.errors import DataError

if TYPE_CHECKING:  # annotations only: the analysis child imports sources without pydantic-settings
    from flame.config import DataSourceSettings

__all__ = [
    "FileSource",
    "LocalSource",
    "MemorySource",
    "Source",
    "open_source",
    "open_sources",
    "probe_sources",
    "safe_relative",
]


def open_source(settings: DataSourceSettings, token_source: object | None = None) -> object:
    """The source `settings` describe; give it to `flame.data.Data` under `settings.name`."""
    from flame.clients.token import TokenSource, source_service_name

    tokens = token_source
    if tokens is None and settings.kind != "local":
        tokens = TokenSource(settings, source_service_name(settings.name))
    assert tokens is None or isinstance(tokens, TokenSource)
    if settings.kind == "local":
        if settings.path is None:
            raise DataError(f"data source {settings.name!r}: kind=local needs a path")
        return LocalSource(settings.path, name=settings.name, encoding=settings.encoding)
    if settings.kind == "fhir":
        from flame.data.sources.fhir import FhirSource

        return FhirSource.from_settings(settings, tokens)
    if settings.kind == "http":
        from flame.data.sources.http import HttpFileSource

        return HttpFileSource.from_settings(settings, tokens)
    if settings.kind == "sql":
        from flame.data.sources.sql import SqlSource

        return SqlSource.from_settings(settings, tokens)
    from flame.data.sources.s3 import S3Source

    return S3Source.from_settings(settings, tokens)


def probe_sources(sources: Mapping[str, object]) -> None:
    """Touch every source once at start-up; a rejected token raises `TokenError`.

    Local sources have nothing to probe. The first failure is raised, so the node stops
    before any work with one line naming the source.
    """
    for source in sources.values():
        probe = getattr(source, "probe", None)
        if callable(probe):
            probe()


def open_sources(settings: Sequence[DataSourceSettings]) -> dict[str, object]:
    """name -> source for every configured source, in config order (first is the default)."""
    sources: dict[str, object] = {}
    for entry in settings:
        if entry.name in sources:
            raise DataError(f"two data sources are named {entry.name!r}")
        sources[entry.name] = open_source(entry)
    return sources

"""FHIR R4 REST search as a data source: paged, optionally as columns.

A search follows the server's `next` links, and stops with an error naming the source when
a link repeats, leads to another host, or the search passes `max_pages` pages (10,000) or
`max_resources` resources (1,000,000): a server minting fresh links forever cannot keep
the node paging and its memory growing. Inside a node the epoch's deadline bounds it too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import httpx
import numpy as np

from flame.clients.token import TokenError, TokenSource, source_service_name
from flame.data.sources._http import HttpStatusError, Params, _HttpService
from flame.errors import DataError

__all__ = ["FhirSource"]

_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
MAX_PAGES = 10_000
MAX_RESOURCES = 1_000_000


def _walk(resource: Any, path: Sequence[str]) -> Any:
    """Follow a dotted path; a list is indexed by a numeric segment, else its first item."""
    value = resource
    for segment in path:
        if isinstance(value, list):
            if segment.isdigit():
                index = int(segment)
                value = value[index] if index < len(value) else None
                continue
            value = value[0] if value else None
        if isinstance(value, dict):
            value = value.get(segment)
        else:
            return None
        if value is None:
            return None
    if isinstance(value, list):
        value = value[0] if value else None
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _to_column(values: list[Any]) -> np.ndarray:
    """float64 (NaN for missing) when every present value is a JSON number, else text."""
    if all(v is None or _is_number(v) for v in values):
        return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    return np.array([_text(v) for v in values], dtype=str)


class FhirSource(_HttpService):
    """A FHIR R4 REST endpoint: searches streamed page by page, optionally as columns."""

    kind: Literal["fhir"] = "fhir"
    remote_methods = ("search", "table", "count")  # what an isolated analysis may call

    def __init__(
        self,
        name: str,
        base_url: str,
        tokens: TokenSource | None = None,
        *,
        page_size: int | None = None,
        max_pages: int = MAX_PAGES,
        max_resources: int = MAX_RESOURCES,
        **options: Any,
    ) -> None:
        super().__init__(name, base_url, tokens, **options)
        self.page_size = page_size
        self.max_pages = max_pages
        self.max_resources = max_resources

    def _type_url(self, resource_type: str) -> str:
        if not _RESOURCE_TYPE.match(resource_type):
            raise DataError(f"data source {self.name!r}: {resource_type!r} is not a resource type")
        return self.base_url + resource_type

    def _bundle(self, url: str | httpx.URL, params: Params | None) -> dict[str, Any]:
        body = self._json("GET", url, params)
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            kind = body.get("resourceType") if isinstance(body, dict) else type(body).__name__
            shown = repr(kind) if self._echoable(kind) else "something else"
            raise DataError(
                f"{self._where('GET', httpx.URL(url))}: expected a FHIR Bundle, got {shown}"
            )
        return body

    def pages(
        self, resource_type: str, params: Params | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """The matching resources one page at a time; only the current page is held."""
        query: dict[str, Any] = dict(params or {})
        if self.page_size is not None:
            query.setdefault("_count", self.page_size)
        url: str | None = self._type_url(resource_type)
        first = True
        seen: set[str] = set()
        pages = resources = 0
        while url is not None:
            if pages >= self.max_pages:
                raise DataError(
                    f"data source {self.name!r}: the search passed {self.max_pages:,} pages "
                    "(max_pages); stopping instead of paging forever (a larger _count "
                    "gives fewer pages)"
                )
            bundle = self._bundle(url, query if first else None)
            first = False
            pages += 1
            entries = bundle.get("entry") or []
            if not isinstance(entries, list):
                raise DataError(f"data source {self.name!r}: Bundle.entry is not a list")
            page: list[dict[str, Any]] = []
            for entry in entries:
                if not isinstance(entry, dict):
                    continue
                mode = (entry.get("search") or {}).get("mode")
                resource = entry.get("resource")
                if isinstance(resource, dict) and mode in (None, "match"):
                    page.append(resource)
            resources += len(page)
            if resources > self.max_resources:
                raise DataError(
                    f"data source {self.name!r}: the search passed {self.max_resources:,} "
                    "resources (max_resources); narrow the search"
                )
            yield page
            url = None
            for link in bundle.get("link") or []:
                if isinstance(link, dict) and link.get("relation") == "next":
                    url = str(link.get("url") or "") or None
            if url is not None:
                if url in seen:
                    raise DataError(
                        f"data source {self.name!r}: the server's next link repeats; "
                        "stopping instead of paging forever"
                    )
                seen.add(url)

    def search(self, resource_type: str, params: Params | None = None) -> Iterator[dict[str, Any]]:
        """Every matching resource, in server order, following `next` links to the end."""
        for page in self.pages(resource_type, params):
            yield from page

    def table(
        self, resource_type: str, fields: Mapping[str, str], params: Params | None = None
    ) -> dict[str, np.ndarray]:
        """Chosen fields of every match as columns (`{"value": "valueQuantity.value"}`).

        Paths are dotted; inside a list, a numeric segment indexes (`code.coding.1.code`)
        and any other segment reads the first item. Columns whose present values are all JSON
        numbers become float64 with NaN where missing; others become text ("" if missing).
        Only the chosen values are kept, never the resources.
        """
        paths = {column: path.split(".") for column, path in fields.items()}
        values: dict[str, list[Any]] = {column: [] for column in fields}
        for resource in self.search(resource_type, params):
            for column, path in paths.items():
                values[column].append(_walk(resource, path))
        return {column: _to_column(column_values) for column, column_values in values.items()}

    def count(self, resource_type: str, params: Params | None = None) -> int:
        """How many resources match, without fetching them (`_summary=count`)."""
        query = {**dict(params or {}), "_summary": "count"}
        total = self._bundle(self._type_url(resource_type), query).get("total")
        if not isinstance(total, int) or isinstance(total, bool):
            raise DataError(f"data source {self.name!r}: the server did not report a total")
        return total

    def probe(self, resource_type: str = "Patient") -> None:
        """One authenticated search, so a rejected token stops the node before any work."""
        try:
            self.count(resource_type)
        except HttpStatusError as exc:
            if exc.status in (401, 403):
                raise TokenError(
                    source_service_name(self.name),
                    f"token rejected by the server (HTTP {exc.status})",
                ) from None
            raise

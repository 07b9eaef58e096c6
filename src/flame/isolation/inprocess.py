"""`analyze` in the node's own process, and what both runners share: the row meter and the
`Outcome` of an epoch. Split from `runner` so the child runner's module stays about the child.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import numpy as np

from flame.data import Data, FileSource, LocalSource
from flame.node.context import Context, active

__all__ = ["InProcessRunner", "Outcome", "RowMeter", "Runner"]

log = logging.getLogger(__name__)


class RowMeter:
    """Counts the rows an epoch read: CSV records of every distinct file served, plus the
    records returned by other sources (FHIR searches and tables)."""

    def __init__(self) -> None:
        self.rows = 0
        self._seen: set[tuple[str, str]] = set()

    def reset(self) -> None:
        self.rows = 0
        self._seen.clear()

    def file(self, source: str, name: str, content: bytes) -> None:
        if (source, name) in self._seen:
            return
        self._seen.add((source, name))
        lower = name.lower()
        if lower.endswith((".csv", ".tsv")):
            text = content.decode("utf-8-sig", errors="replace")
            dialect = "excel-tab" if lower.endswith(".tsv") else "excel"
            records = sum(1 for row in csv.reader(io.StringIO(text, newline=""), dialect) if row)
            self.rows += max(records - 1, 0)
        elif lower.endswith((".jsonl", ".ndjson")):
            self.rows += sum(1 for line in content.splitlines() if line.strip())
        elif lower.endswith((".parquet", ".pq")):
            try:
                import pyarrow.parquet as pq

                self.rows += int(pq.ParquetFile(io.BytesIO(content)).metadata.num_rows)
            except Exception:  # unreadable: no rows counted, min_rows decides
                log.warning("could not count the rows of %s", name)

    def descriptor(self, source: str, name: str, fd: int, count: Callable[[str, int], int]) -> None:
        """A file handed to the child as a descriptor: `count(name, fd)` its rows, once."""
        if (source, name) not in self._seen:
            self._seen.add((source, name))
            self.rows += count(name, fd)

    def records(self, value: Any) -> None:
        if hasattr(value, "num_rows") or hasattr(value, "shape"):  # Arrow / pandas tables
            self.rows += int(value.num_rows if hasattr(value, "num_rows") else value.shape[0])
        elif isinstance(value, list):
            self.rows += len(value)
        elif isinstance(value, dict) and value:
            first = next(iter(value.values()))
            if isinstance(first, (np.ndarray, list)):
                self.rows += len(first)


@dataclass
class Outcome:
    """What one epoch's `analyze` produced, as the runtime saw it."""

    result: Any
    rows_read: int
    details: dict[str, Any] = field(default_factory=dict)


class Runner(Protocol):
    def start(self) -> None: ...

    def run(self, epoch: int, previous: Any) -> Outcome: ...

    def close(self) -> None: ...

    @property
    def declared_spend(self) -> Any: ...

    @property
    def rows_read(self) -> int: ...


class _MeteredSource:
    """A file source whose reads the runtime counts (in-process runs)."""

    def __init__(self, inner: FileSource, meter: RowMeter) -> None:
        self.name = inner.name
        self._inner = inner
        self._meter = meter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def files(self) -> list[str]:
        return self._inner.files()

    def open(self, name: str) -> IO[bytes]:
        with self._inner.open(name) as stream:
            content = stream.read()
        self._meter.file(self.name, name, content)
        return io.BytesIO(content)


def _metered(name: str, source: Any, meter: RowMeter) -> Any:
    """`source` as `analyze` gets it in process: a node folder is served by descriptor, as
    in the isolated child (same path check, rows counted from the file without reading it
    into memory, and `read_csv` streams it into numpy); other file sources are counted
    from their bytes."""
    if isinstance(source, LocalSource):
        from flame.data.sources.descriptor import (
            DescriptorSource,
            count_records,
            open_read_only,
        )

        def fetch(file_name: str) -> int:
            fd = open_read_only(source.root, file_name)
            try:
                meter.descriptor(name, file_name, fd, count_records)
            except BaseException:
                os.close(fd)
                raise
            return fd

        return DescriptorSource(name, source.files, fetch)
    if isinstance(source, FileSource):
        return _MeteredSource(source, meter)
    return source


class InProcessRunner:
    """`analyze` in the node's own process: fast, for the Python API and tests. The policy is
    still checked on what comes back, but the analysis shares the runtime's memory."""

    def __init__(self, analyze: Callable[..., Any], data: Any, context: Context) -> None:
        self.analyze = analyze
        self.context = context
        self.meter = RowMeter()
        if not isinstance(data, Data):
            self.data: Any = data
            return
        metered: dict[str, object] = {
            name: _metered(name, source, self.meter) for name, source in data.sources.items()
        }
        self.data = Data(metered, node_id=data.node_id)

    @property
    def declared_spend(self) -> Any:
        original = getattr(self.analyze, "__wrapped__", self.analyze)
        return getattr(original, "__flame_spend__", None)

    @property
    def rows_read(self) -> int:
        """Rows served to `analyze` so far in this epoch (what a message is checked against)."""
        return self.meter.rows

    def start(self) -> None:
        return None

    def run(self, epoch: int, previous: Any) -> Outcome:
        self.meter.reset()
        with active(self.context):
            result = self.analyze(self.data, epoch=epoch, previous=previous)
        return Outcome(result, self.meter.rows)

    def close(self) -> None:
        return None

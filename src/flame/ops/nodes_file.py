"""`flame simulate --nodes nodes.toml`: each simulated node with its own data sources.

    [nodes.clinic_a]
    data = "data/clinic_a"                 # a local folder, relative to this file

    [[nodes.clinic_b.sources]]             # any configured source kind, as on a real node
    name = "fhir"
    kind = "fhir"
    url = "http://127.0.0.1:8080/fhir"

    [[nodes.clinic_c.sources]]
    name = "omop"
    kind = "sql"
    url = "postgresql://analyst@127.0.0.1:5432/omop_c"
    token_file = "secrets/omop_c_password"  # the password, never in this file

A source entry takes the same fields as `FLAME_DATA` on a node (`flame.config.
DataSourceSettings`). Every source is probed once before the run, so a wrong URL or
password stops the simulation with one line naming the node and the source.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flame.config import DataSourceSettings, format_validation_error
from flame.data import Data
from flame.data.sources import LocalSource, open_source, probe_sources
from flame.errors import ConfigError, FlameError

__all__ = ["load_nodes"]


def _toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        document: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
        return document
    except OSError as exc:
        raise ConfigError(f"--nodes {path}: cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--nodes {path}: not valid TOML: {exc}") from None


def _relative(value: Any, base: Path) -> Any:
    if isinstance(value, str) and not Path(value).is_absolute():
        return str(base / value)
    return value


def _settings(node: str, index: int, raw: Any, base: Path, where: str) -> DataSourceSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: node {node!r} source {index + 1} must be a table")
    entry = dict(raw)
    for key in ("path", "token_file", "verify_key_file"):
        if key in entry:
            entry[key] = _relative(entry[key], base)
    entry.setdefault("name", entry.get("kind", "default"))
    try:
        return DataSourceSettings(**entry)
    except ValidationError as exc:
        lines = format_validation_error(exc).splitlines()
        detail = "; ".join(line.split(" / ", 1)[-1] for line in lines)
        raise ConfigError(f"{where}: node {node!r} source {index + 1}: {detail}") from None


def load_nodes(path: Path, *, probe: bool = True) -> dict[str, Data]:
    """node id -> `Data` with that node's sources, from a nodes file (format above)."""
    document = _toml(path)
    nodes = document.get("nodes")
    unknown = sorted(set(document) - {"nodes"})
    if unknown:
        raise ConfigError(f"--nodes {path}: unknown top-level key(s) {unknown}; use [nodes.ID]")
    if not isinstance(nodes, dict) or not nodes:
        raise ConfigError(f"--nodes {path}: no nodes (add a [nodes.ID] table per node)")
    base = path.resolve().parent
    where = f"--nodes {path}"
    handles: dict[str, Data] = {}
    for node, spec in nodes.items():
        if not isinstance(spec, dict) or not set(spec) <= {"data", "sources"} or not spec:
            raise ConfigError(
                f'{where}: node {node!r} needs `data = "folder"` and/or [[nodes.{node}.sources]]'
            )
        sources: dict[str, object] = {}
        if "data" in spec:
            sources["local"] = LocalSource(_relative(str(spec["data"]), base))
        raw_sources = spec.get("sources", [])
        if not isinstance(raw_sources, list):
            raise ConfigError(f"{where}: node {node!r}: sources must be a list of tables")
        for index, raw in enumerate(raw_sources):
            settings = _settings(node, index, raw, base, where)
            if settings.name in sources:
                raise ConfigError(f"{where}: node {node!r} has two sources named {settings.name!r}")
            sources[settings.name] = open_source(settings)
        if probe:
            try:
                probe_sources(sources)
            except FlameError as exc:
                raise FlameError(f"node {node!r}: {exc}") from None
        handles[node] = Data(sources, node_id=node)
    return handles

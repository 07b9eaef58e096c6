"""Values the analyst marks for the node runtime: `flame.secure`, `flame.counts`, `flame.dp.*`.

A marker is a frozen dataclass registered here under a kind name. Markers cross from the
analysis child to the node runtime as tagged dicts (the tag key starts with a NUL character,
which no sensible result key does); the runtime turns them back into markers and enforces
them. A forged tag can only ask the runtime for more enforcement, never for less.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["TAG", "from_plain", "register", "to_plain"]

TAG = "\x00flame"
_KINDS: dict[str, type[Any]] = {}
T = TypeVar("T", bound=type[Any])


def register(kind: str) -> Callable[[T], T]:
    """Class decorator: make a frozen dataclass a marker that crosses the child boundary."""

    def decorate(cls: T) -> T:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"marker {cls.__name__} must be a dataclass")
        _KINDS[kind] = cls
        setattr(cls, "_flame_kind", kind)  # noqa: B010
        return cls

    return decorate


def to_plain(value: Any) -> Any:
    """The value with every marker replaced by its tagged-dict form (recursively)."""
    kind = getattr(type(value), "_flame_kind", None)
    if kind is not None and dataclasses.is_dataclass(value):
        plain: dict[str, Any] = {TAG: kind}
        for field in dataclasses.fields(value):
            plain[field.name] = to_plain(getattr(value, field.name))
        return plain
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def from_plain(value: Any) -> Any:
    """Markers back from their tagged-dict form; a malformed tag raises ValueError."""
    if isinstance(value, dict):
        if TAG in value:
            kind = value[TAG]
            cls = _KINDS.get(kind) if isinstance(kind, str) else None
            if cls is None:
                raise ValueError(f"unknown marker kind {str(kind)[:40]!r}")
            names = {f.name for f in dataclasses.fields(cls)}
            given = set(value) - {TAG}
            if not given <= names:
                raise ValueError(f"marker {kind!r} has unknown fields {sorted(given - names)}")
            return cls(**{k: from_plain(v) for k, v in value.items() if k != TAG})
        return {k: from_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_plain(v) for v in value]
    return value

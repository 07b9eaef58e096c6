"""A tiny YAML emitter for the deployment kit: manifests without a YAML library at run time.

Only what manifests need: mappings, lists, strings, integers, booleans and None. A string
is written plain when YAML cannot read it as anything else, as a block literal when it is a
file's text (config files, the roster), and otherwise double-quoted with escapes for anything
outside YAML's printable set. tests/test_deploy_kit.py reads documents back with PyYAML
and compares them with what was emitted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["dump", "dump_all"]

_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./@-]*")
# words YAML 1.1 (PyYAML, Kubernetes' parser) reads as booleans or null
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _RESERVED:
            return value
        return _quoted(value)
    raise TypeError(f"cannot write a {type(value).__name__} as YAML")


def _printable(char: str) -> bool:
    """YAML's printable set, minus the line breaks a double-quoted scalar would fold."""
    code = ord(char)
    return (
        0x20 <= code <= 0x7E
        or 0xA0 <= code <= 0xD7FF
        or (0xE000 <= code <= 0xFFFD and code not in (0xFEFF,))
        or code >= 0x10000
    ) and code not in (0x2028, 0x2029)


def _quoted(text: str) -> str:
    """A double-quoted scalar; anything outside YAML's printable set is escaped."""
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif _printable(char):
            out.append(char)
        elif ord(char) <= 0xFF:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    out.append('"')
    return "".join(out)


def _is_block_text(value: Any) -> bool:
    """File text: written as `|` so a reader of the manifest sees the file as it is."""
    if not isinstance(value, str) or not value.endswith("\n") or value.endswith("\n\n"):
        return False
    lines = value[:-1].split("\n")
    return (
        len(lines) > 1
        and lines[0] != ""
        and not lines[0].startswith((" ", "\t"))
        and all(line == line.rstrip() and all(map(_printable, line)) for line in lines)
    )


def _key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"mapping keys must be strings, not {type(key).__name__}")
    return _scalar(key)


def _lines(value: Any, indent: int) -> Iterable[str]:
    pad = " " * indent
    if isinstance(value, Mapping):
        if not value:
            yield pad + "{}"
        for key, item in value.items():
            yield from _entry(pad + _key(key) + ":", item, indent)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            yield pad + "[]"
        for item in value:
            if isinstance(item, Mapping) and item:
                inner = list(_lines(item, indent + 2))
                yield pad + "- " + inner[0][indent + 2 :]
                yield from inner[1:]
            else:
                yield from _entry(pad + "-", item, indent)
    else:
        yield pad + _scalar(value)


def _nested(item: Any) -> bool:
    """A non-empty mapping or list: written on the lines below its key."""
    return bool(item) and isinstance(item, (Mapping, Sequence)) and not isinstance(item, str)


def _entry(head: str, item: Any, indent: int) -> Iterable[str]:
    """`head` (a `key:` or `-`) followed by `item`, inline when it is a scalar."""
    if _is_block_text(item):
        yield head + " |"
        yield from (" " * (indent + 2) + line if line else "" for line in item[:-1].split("\n"))
    elif _nested(item):
        yield head
        yield from _lines(item, indent + 2)
    else:
        yield head + " " + next(iter(_lines(item, 0)))


def dump(value: Any) -> str:
    """One YAML document."""
    return "\n".join(_lines(value, 0)) + "\n"


def dump_all(documents: Iterable[Any], header: str = "") -> str:
    """Several documents, `---` between them; `header` lines become comments at the top."""
    comments = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    return comments + "---\n".join(dump(document) for document in documents)

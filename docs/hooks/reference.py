"""Reference pages generated from the code at build time (a MkDocs hook; no network).

A page asks for a generated part with a marker line, e.g. `<!-- flame:settings -->`; the hook
replaces it with Markdown built from the code itself, so the reference cannot drift from it:

* `settings`    every `FLAME_*` variable, from the pydantic models in `flame.config`
* `data-source` the fields of one data source (`FLAME_DATA` entries, `[[data]]` in a file)
* `policy`      every node-policy key, from `flame.privacy.policy.NodePolicy`
* `aggregator-policy` every key of the aggregator's policy, from `flame.privacy.central`
* `cli`         every `flame` command's `--help`, from the argument parsers
* `api`         the public API (`flame.__all__`) with signatures and docstrings
* `layout`      the source tree, from the packages' and modules' docstrings

tests/test_docs.py imports this file to check that nothing is left out.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import enum
import inspect
import os
import re
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

SRC = Path(__file__).resolve().parents[2] / "src" / "flame"
NONE = "\N{EN DASH}"  # a default of None: nothing set
MARKER = re.compile(r"^<!-- flame:([a-z-]+) -->$", re.M)


# --- settings ---------------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    """A short, readable type: `int`, `path`, `'a' | 'b'`, `list[str]`, optional as `| None`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(parts) + (" | None" if type(None) in args else "")
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type):
        if issubclass(annotation, Path):
            return "path"
        if annotation.__name__ == "SecretStr":
            return "secret"
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None or isinstance(value, BaseModel):
        return NONE
    if value in ([], {}, ""):
        return f"`{value!r}`"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    mib = 1024 * 1024
    if isinstance(value, int) and not isinstance(value, bool) and value >= mib and not value % mib:
        return f"`{value}` ({value // (1024 * 1024)} MiB)"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def setting_rows(
    model: type[BaseModel], prefix: str = "FLAME_"
) -> Iterator[tuple[str, str, str, str]]:
    """(variable, type, default, description) for every leaf setting; sections recurse."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from setting_rows(annotation, f"{prefix}{name.upper()}__")
            continue
        yield (
            f"{prefix}{name.upper()}",
            _type_name(annotation),
            _default(field),
            field.description or "",
        )


def _section_doc(model: type[BaseModel]) -> str:
    return inspect.cleandoc(model.__doc__ or "").split("\n\n")[0].replace("\n", " ")


def settings_markdown() -> str:
    from flame.config import FlameConfig

    out: list[str] = []
    sections: dict[str, list[tuple[str, str, str, str]]] = {}
    for row in setting_rows(FlameConfig):
        section = row[0].split("__")[0] if "__" in row[0] else ""
        sections.setdefault(section, []).append(row)
    for section, rows in sections.items():
        if section:
            model = FlameConfig.model_fields[section.removeprefix("FLAME_").lower()].annotation
            assert isinstance(model, type)
            out.append(f"### `{section}__*`\n\n{_section_doc(model)}\n")
        else:
            out.append("### Top-level settings\n")
        out.append("| variable | type | default | meaning |\n|---|---|---|---|")
        out.extend(f"| `{v}` | {_cell(t)} | {_cell(d)} | {_cell(m)} |" for v, t, d, m in rows)
        out.append("")
    return "\n".join(out)


def _field_table(model: type[BaseModel], key: str) -> str:
    out = [f"| {key} | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        out.append(
            f"| `{name}` | {_cell(_type_name(field.annotation))} | {_cell(_default(field))} "
            f"| {_cell(field.description or '')} |"
        )
    return "\n".join(out) + "\n"


def data_source_markdown() -> str:
    from flame.config import DataSourceSettings

    return _field_table(DataSourceSettings, "field")


def policy_markdown() -> str:
    from flame.privacy.policy import NodePolicy

    return _field_table(NodePolicy, "key")


def aggregator_policy_markdown() -> str:
    from flame.privacy.central import AggregatorPolicy

    return _field_table(AggregatorPolicy, "key")


# --- CLI --------------------------------------------------------------------------------------


class _Captured(Exception):
    """Stops a command once it has built its own parser (see `_delegated_parser`)."""


# Commands that hand their arguments (argparse.REMAINDER) to a parser they build when they run,
# and the leading words that select each such parser.
DELEGATED: dict[str, list[list[str]]] = {"keys": [[], ["identity"]]}


def _delegated_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser `flame ARGV` builds after the top-level one: parse_args is intercepted."""
    from flame.cli.app import main

    original = argparse.ArgumentParser.parse_args
    captured: list[argparse.ArgumentParser] = []

    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        if self.prog == "flame":
            return original(self, *args, **kwargs)
        captured.append(self)
        raise _Captured

    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    try:
        with contextlib.suppress(_Captured):
            main(argv)
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    if not captured:
        raise RuntimeError(f"flame {' '.join(argv)} built no parser of its own")
    return captured[0]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def cli_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every `flame` command line ('flame', 'flame simulate', 'flame keys generate', ...)."""
    from flame.cli.app import _parser

    found: dict[str, argparse.ArgumentParser] = {}

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        found[name] = parser
        for sub, subparser in _subcommands(parser).items():
            command = f"{name} {sub}"
            if sub in DELEGATED and name == "flame":
                for words in DELEGATED[sub]:
                    walk(" ".join([command, *words]), _delegated_parser([sub, *words]))
            else:
                walk(command, subparser)

    with _columns(100):
        walk("flame", _parser())
    return found


@contextlib.contextmanager
def _columns(width: int) -> Iterator[None]:
    """argparse wraps help to $COLUMNS: fix it so the page does not depend on the terminal."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def cli_markdown() -> str:
    out: list[str] = []
    with _columns(100):
        for name, parser in cli_parsers().items():
            if _subcommands(parser) and name != "flame":
                continue  # a group (flame keys): its commands follow
            out.append(f"### `{name}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(out)


# --- public API -------------------------------------------------------------------------------


def _annotation(annotation: Any) -> str:
    if isinstance(annotation, str):  # `from __future__ import annotations`: already text
        return annotation
    return inspect.formatannotation(annotation)


def _signature(obj: Any) -> str:
    """The call signature as the source spells it (annotations unquoted)."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    parts: list[str] = []
    star_done = False
    for index, parameter in enumerate(signature.parameters.values()):
        if index == 0 and parameter.name in ("self", "cls"):
            continue
        if parameter.kind is parameter.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if parameter.kind is parameter.VAR_POSITIONAL:
            star_done = True
        text = {parameter.VAR_POSITIONAL: "*", parameter.VAR_KEYWORD: "**"}.get(
            parameter.kind, ""
        ) + parameter.name
        if parameter.annotation is not parameter.empty:
            text += f": {_annotation(parameter.annotation)}"
        if parameter.default is not parameter.empty:
            text += (
                f" = {parameter.default!r}"
                if parameter.annotation is not parameter.empty
                else f"={parameter.default!r}"
            )
        parts.append(text)
    result = f"({', '.join(parts)})"
    if signature.return_annotation is not signature.empty:
        result += f" -> {_annotation(signature.return_annotation)}"
    return result


def _doc(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip() or "*(no docstring)*"


def _fence_doc(doc: str) -> str:
    """Docstrings are plain text with `code`: keep their line breaks, indent nothing."""
    return "\n".join(line.rstrip() for line in doc.splitlines()) + "\n"


def api_entries() -> list[tuple[str, str, Any]]:
    """(name, kind, object) for every name in flame.__all__, in a stable order."""
    import flame

    entries = []
    for name in sorted(flame.__all__, key=str.lower):
        obj = getattr(flame, name)
        if isinstance(obj, types.ModuleType):
            kind = "module"
        elif inspect.isclass(obj):
            kind = "exception" if issubclass(obj, BaseException) else "class"
        elif callable(obj):
            kind = "function"
        else:
            kind = "constant"
        entries.append((name, kind, obj))
    return entries


def _public_members(obj: Any) -> Iterator[tuple[str, Any]]:
    """Documented public methods and properties a class defines itself."""
    for name, member in vars(obj).items():
        if name.startswith("_") or not (inspect.getdoc(member) or "").strip():
            continue
        if isinstance(member, (property, staticmethod, classmethod)) or inspect.isfunction(member):
            yield name, member


def _pydantic_note(obj: Any) -> str:
    pages = {"FlameConfig": "settings.md", "NodePolicy": "policy.md"}
    page = pages.get(obj.__name__)
    where = f" Its fields: [{page.removesuffix('.md')} reference]({page})." if page else ""
    return f"A pydantic model (keyword arguments, validated).{where}\n"


def _heading(qualified: str, kind: str, signature: str, doc: str, level: str = "###") -> str:
    code = f"```python\n{qualified}{signature}\n```\n\n" if signature else ""
    return f"{level} `{qualified}`\n\n*{kind}*\n\n{code}{_fence_doc(doc)}"


def api_markdown() -> str:
    out: list[str] = []
    for name, kind, obj in api_entries():
        qualified = f"flame.{name}"
        if kind == "constant":
            out.append(f"### `{qualified}`\n\n*constant*: `{obj!r}`\n")
            continue
        if kind == "module":
            out.append(_heading(qualified, f"module {obj.__name__}", "", _doc(obj)))
            for fname, function in vars(obj).items():
                if (
                    inspect.isfunction(function)
                    and not fname.startswith("_")
                    and function.__module__ == obj.__name__
                    and fname in getattr(obj, "__all__", [fname])
                ):
                    out.append(
                        _heading(
                            f"{qualified}.{fname}",
                            "function",
                            _signature(function),
                            _doc(function),
                            "####",
                        )
                    )
            continue
        if inspect.isclass(obj) and issubclass(obj, BaseModel):
            out.append(_heading(qualified, "class", "", _doc(obj)) + _pydantic_note(obj))
            continue
        signature = "" if kind == "exception" else _signature(obj)
        out.append(_heading(qualified, kind, signature, _doc(obj)))
        if kind == "class":
            for member_name, member in _public_members(obj):
                target = member.fget if isinstance(member, property) else member
                target = getattr(target, "__func__", target)
                sig = "" if isinstance(member, property) else _signature(target)
                what = "property" if isinstance(member, property) else "method"
                out.append(_heading(f"{name}.{member_name}", what, sig, _doc(target), "####"))
    return "\n".join(out)


# --- layout -----------------------------------------------------------------------------------


def _first_line(path: Path) -> str:
    try:
        doc = ast.get_docstring(ast.parse(path.read_text()))
    except SyntaxError:
        return ""
    return (doc or "").strip().split("\n\n")[0].replace("\n", " ")


def layout_markdown() -> str:
    out = ["| module | what it is for |", "|---|---|"]
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "__main__.py" or "__pycache__" in path.parts:
            continue
        relative = path.relative_to(SRC.parent)
        name = str(relative.with_suffix("")).replace(os.sep, ".")
        if path.name == "__init__.py":
            name = name.removesuffix(".__init__")
            name = f"**{name}/**" if name != "flame" else "**flame**"
        else:
            name = f"`{name}`"
        out.append(f"| {name} | {_cell(_first_line(path))} |")
    return "\n".join(out) + "\n"


GENERATORS: dict[str, Callable[[], str]] = {
    "settings": settings_markdown,
    "data-source": data_source_markdown,
    "policy": policy_markdown,
    "aggregator-policy": aggregator_policy_markdown,
    "cli": cli_markdown,
    "api": api_markdown,
    "layout": layout_markdown,
}


def expand(markdown: str) -> str:
    """Replace every `<!-- flame:NAME -->` line with what GENERATORS[NAME] writes."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise KeyError(f"unknown generated section <!-- flame:{name} -->")
        return GENERATORS[name]()

    return MARKER.sub(one, markdown)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """MkDocs hook: expand the markers of every page."""
    return expand(markdown)


if __name__ == "__main__":  # print every generated section (to look at it without mkdocs)
    for name, generate in GENERATORS.items():
        print(f"<!-- {name} -->\n{generate()}")

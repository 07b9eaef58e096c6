"""Notebook code made into a file an isolated child can import.

A function typed into a Jupyter or IPython cell has no file, but the kernel keeps each cell's
source (`linecache`), so the child need not share the kernel's memory (forking a kernel that
holds ZeroMQ sockets and threads is what used to hang). The exported module holds the
function's source and, recursively, exactly the notebook names its code loads: modules become
imports, functions from files become imports, notebook functions and classes (found through
their methods' cells) are copied as source, and plain literals (numbers, strings, containers
of them) and numeric numpy arrays (their exact bytes) are written out. Anything else (a
DataFrame, an object array, an open connection) is refused by name: copying live objects
would need pickle, and the analysis should compute them itself.
"""

from __future__ import annotations

import ast
import dis
import hashlib
import inspect
import linecache
import os
import sys
import tempfile
import textwrap
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flame.errors import FlameError

__all__ = ["export_cell_function"]

_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})
_LITERALS = (type(None), bool, int, float, complex, str, bytes)
_MAX_LITERAL_CHARS = 1_000_000
_directory: Path | None = None


def _global_loads(code: types.CodeType) -> list[str]:
    """Names the code (and its nested functions and comprehensions) loads as globals."""
    names: list[str] = []
    for instruction in dis.get_instructions(code):
        if instruction.opname in _LOADS and isinstance(instruction.argval, str):
            names.append(instruction.argval)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names.extend(_global_loads(constant))
    return names


def _definition_loads(source: str) -> list[str]:
    """Names a `def` statement itself evaluates: its decorators and default values."""
    tree = ast.parse(source)
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return []
    parts: list[ast.AST] = [*node.decorator_list, *node.args.defaults]
    parts += [d for d in node.args.kw_defaults if d is not None]
    return [
        n.id for part in parts for n in ast.walk(part)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
    ]


def _methods(cls: type) -> list[types.FunctionType]:
    """The functions a class body defined (plain, static, class methods, properties)."""
    found: list[types.FunctionType] = []
    for member in vars(cls).values():
        for candidate in (
            member,
            getattr(member, "__func__", None),
            getattr(member, "fget", None),
            getattr(member, "fset", None),
        ):
            if isinstance(candidate, types.FunctionType):
                found.append(candidate)
    return found


def _class_statement(cls: type) -> tuple[str, ast.ClassDef] | None:
    """The source of `class ...:` (decorators included) and its statement, from the cell
    that holds the class's methods; None when it has none or the cell is not kept."""
    for method in _methods(cls):
        filename = method.__code__.co_filename
        text = "".join(linecache.getlines(filename))
        if not text:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        line = method.__code__.co_firstlineno
        for statement in tree.body:
            if (
                isinstance(statement, ast.ClassDef)
                and statement.name == cls.__name__
                and statement.lineno <= line <= (statement.end_lineno or 0)
            ):
                first = min([statement.lineno, *(d.lineno for d in statement.decorator_list)])
                lines = text.splitlines(keepends=True)[first - 1 : statement.end_lineno]
                return textwrap.dedent("".join(lines)), statement
    return None


def _class_level(statement: ast.ClassDef) -> list[ast.AST]:
    """What a class statement evaluates itself: decorators, bases, keywords, and its body
    outside the method bodies (a method's own loads come from its bytecode)."""
    parts: list[ast.AST] = [*statement.decorator_list, *statement.bases]
    parts += [keyword.value for keyword in statement.keywords]
    for item in statement.body:
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
            parts += [*item.decorator_list, *item.args.defaults]
            parts += [d for d in item.args.kw_defaults if d is not None]
        else:
            parts.append(item)
    return parts


def _is_literal(value: Any, depth: int = 0) -> bool:
    if depth > 20:
        return False
    if isinstance(value, _LITERALS):
        return True
    if isinstance(value, list | tuple | set | frozenset):
        return all(_is_literal(item, depth + 1) for item in value)
    if isinstance(value, dict):
        items = value.items()
        return all(_is_literal(k, depth + 1) and _is_literal(v, depth + 1) for k, v in items)
    return False


_ARRAY_KINDS = frozenset("biufc")  # bool, int, uint, float, complex: raw bytes say it all
_MAX_ARRAY_BYTES = 16 * 1024 * 1024


def _numpy_source(name: str, value: Any) -> str | None:
    """A numeric numpy array or scalar as the exact bytes it holds (hex), typed and shaped;
    None for anything numpy can hold that bytes do not describe (objects, strings)."""
    numpy = sys.modules.get("numpy")
    if numpy is None or not isinstance(value, numpy.ndarray | numpy.generic):
        return None
    array = numpy.asarray(value)
    if array.dtype.kind not in _ARRAY_KINDS or array.nbytes > _MAX_ARRAY_BYTES:
        return None
    data = numpy.ascontiguousarray(array).tobytes().hex()
    made = (
        f"__import__('numpy').frombuffer(bytes.fromhex({data!r}), "
        f"dtype={array.dtype.str!r}).reshape({array.shape!r})"
    )
    if isinstance(value, numpy.generic):
        return f"{name} = {made}[()]"
    return f"{name} = {made}.copy()"  # writable, like the notebook's own array


def _literal_source(name: str, value: Any) -> str | None:
    """`name = <literal>` when the value reads back equal and of the same type, else None."""
    if type(value) is float and (value != value or abs(value) == float("inf")):
        return f"{name} = float({repr(value)!r})"  # nan, inf: no literal, and exact this way
    numeric = _numpy_source(name, value)
    if numeric is not None:
        return numeric
    if type(value) in (set, frozenset) and not value:
        text = f"{type(value).__name__}()"
    else:
        if not _is_literal(value):
            return None
        text = repr(value)
        if len(text) > _MAX_LITERAL_CHARS:
            return None
        try:
            back = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None  # nan, inf, or a container of them
        if type(value) is frozenset:
            text, back = f"frozenset({text})", frozenset(back)
        if back != value or type(back) is not type(value):
            return None
    return f"{name} = {text}"


class _Exporter:
    def __init__(self, namespace: dict[str, Any], root: str) -> None:
        self.namespace = namespace
        self.root = root
        self.imports: dict[str, str] = {}
        self.literals: dict[str, str] = {}
        self.functions: dict[str, str] = {}  # in dependency order: what a def needs first

    def refuse(self, name: str, value: Any, why: str) -> FlameError:
        return FlameError(
            f"{self.root} cannot run isolated: it uses the notebook name {name!r} "
            f"({type(value).__name__}), which {why}; compute it inside {self.root}, define it in "
            f"a .py file and import it, or pass isolate=False to flame.simulate"
        )

    def add_function(self, name: str, function: types.FunctionType) -> None:
        if name in self.functions:
            return
        if "<" in function.__qualname__ or "." in function.__qualname__:
            raise self.refuse(name, function, "is a lambda, a method or a nested function")
        try:
            source = textwrap.dedent(inspect.getsource(function))
        except (OSError, TypeError):
            raise self.refuse(name, function, "has no source the kernel kept") from None
        self.functions[name] = ""  # placeholder: a recursive function refers to itself
        for needed in [*_definition_loads(source), *_global_loads(function.__code__)]:
            self.add_name(needed)
        del self.functions[name]
        if function.__name__ != name:
            source += f"\n{name} = {function.__name__}\n"
        self.functions[name] = source

    def add_class(self, name: str, cls: type) -> None:
        """A class typed into a cell: its statement found in the cell its methods came from
        (classes keep no file, but their functions keep their cell's name)."""
        if name in self.functions:
            return
        found = _class_statement(cls)
        if found is None or "." in cls.__qualname__ or "<" in cls.__qualname__:
            raise self.refuse(name, cls, "is a class defined in a cell whose source is not kept")
        source, statement = found
        self.functions[name] = ""  # placeholder: methods may name their own class
        needed = [
            n.id
            for part in _class_level(statement)
            for n in ast.walk(part)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
        ]
        for method in _methods(cls):
            needed += _global_loads(method.__code__)
        for each in needed:
            self.add_name(each)
        del self.functions[name]
        if cls.__name__ != name:
            source += f"\n{name} = {cls.__name__}\n"
        self.functions[name] = source

    def add_name(self, name: str) -> None:
        if name in self.imports or name in self.literals or name in self.functions:
            return
        if name not in self.namespace:
            return  # a builtin, or a name the function defines itself at run time
        value = self.namespace[name]
        if isinstance(value, types.ModuleType):
            self.imports[name] = f"import {value.__name__} as {name}"
            return
        module = getattr(value, "__module__", None)
        qualname = getattr(value, "__qualname__", None)
        if module == "__main__" and isinstance(value, types.FunctionType):
            self.add_function(name, value)
            return
        if module == "__main__" and isinstance(value, type):
            self.add_class(name, value)
            return
        if (
            isinstance(module, str) and module != "__main__" and isinstance(qualname, str)
            and "<" not in qualname and "." not in qualname
            and isinstance(value, types.FunctionType | types.BuiltinFunctionType | type)
        ):
            self.imports[name] = f"from {module} import {qualname} as {name}"
            return
        literal = _literal_source(name, value)
        if literal is None:
            raise self.refuse(name, value, "cannot be written out as source")
        self.literals[name] = literal

    def module_source(self) -> str:
        return "\n".join(
            [
                f'"""{self.root} and the notebook names it uses, exported by flame for an '
                'isolated child."""',
                "from __future__ import annotations",
                *self.imports.values(),
                *self.literals.values(),
                *self.functions.values(),
            ]
        ) + "\n"


def _export_directory() -> Path:
    """One private folder per process (0700), removed with the process's temporary files."""
    global _directory
    if _directory is None or not _directory.is_dir():
        _directory = Path(tempfile.mkdtemp(prefix="flame-cells-"))
    return _directory


def export_cell_function(function: Callable[..., Any]) -> dict[str, Any] | None:
    """A child locator for `function` defined in a notebook or IPython cell, or None when
    its source is not kept (code typed into `python -` or the plain REPL). Raises FlameError
    naming a notebook name the function uses that cannot be copied."""
    if not isinstance(function, types.FunctionType):
        return None
    try:
        inspect.getsource(function)
    except (OSError, TypeError):
        return None
    name = function.__name__
    exporter = _Exporter(function.__globals__, name)
    exporter.add_function(name, function)
    source = exporter.module_source()
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    path = _export_directory() / f"flame_cell_{digest}.py"
    if not path.exists():
        partial = path.with_suffix(".tmp")
        partial.write_text(source, encoding="utf-8")
        os.replace(partial, path)
    return {"module": f"flame_cell_{digest}", "file": str(path), "qualname": name}

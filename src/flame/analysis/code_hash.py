"""SHA-256 of the analyst's code, for provenance and for refusing to resume a run with
different code.

Functions defined in a file hash that whole file (what `flame run analysis.py` ships).
Functions with no file behind them (`python -c`, stdin, a notebook cell, `exec`) hash their
source text when Python still has it (notebooks keep it in `linecache`), else their bytecode,
walked field by field so the hash is the same in every process (marshal output and set
ordering are not).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flame.errors import AnalysisLoadError, ConfigError

__all__ = ["code_hash"]


def _unwrap(function: Any) -> Any:
    for _ in range(100):
        if isinstance(function, functools.partial):
            function = function.func
        elif hasattr(function, "__wrapped__"):
            function = function.__wrapped__
        else:
            break
    if isinstance(function, types.MethodType):
        function = function.__func__
    if not isinstance(function, (types.FunctionType, type)) and callable(function):
        call = inspect.getattr_static(type(function), "__call__", None)  # its class's code
        if isinstance(call, types.FunctionType):
            return call
    return function


def _file(function: Any) -> Path | None:
    try:
        name = inspect.getsourcefile(function)
    except TypeError:  # builtins, C functions
        return None
    path = Path(name) if name else None
    return path if path is not None and path.is_file() else None


def _constant(value: Any, digest: Any) -> None:
    if isinstance(value, types.CodeType):
        _bytecode(value, digest)
    elif isinstance(value, (tuple, frozenset)):
        items = [hashlib.sha256() for _ in value]
        for item, part in zip(items, value, strict=True):
            _constant(part, item)
        parts = [item.digest() for item in items]
        digest.update(type(value).__name__.encode() + b"(")
        for part_digest in sorted(parts) if isinstance(value, frozenset) else parts:
            digest.update(part_digest)
        digest.update(b")")
    else:
        digest.update(f"{type(value).__name__}:{value!r}\0".encode())


def _bytecode(code: types.CodeType, digest: Any) -> None:
    digest.update(code.co_name.encode() + b"\0" + code.co_code)
    for names in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
        digest.update(("\0".join(names) + "\1").encode())
    for constant in code.co_consts:
        _constant(constant, digest)


def _source_free(role: str, function: Any) -> bytes:
    """What identifies a function that no file on disk holds."""
    try:
        return f"{role}:source\0".encode() + inspect.getsource(function).encode()
    except (OSError, TypeError):
        pass
    code = getattr(function, "__code__", None)
    if isinstance(code, types.CodeType):
        digest = hashlib.sha256()
        _bytecode(code, digest)
        return f"{role}:bytecode\0".encode() + digest.digest()
    name = f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', '')}"
    return f"{role}:name\0{type(function).__name__}:{name}".encode()


def code_hash(functions: Iterable[tuple[str, Callable[..., Any] | None]]) -> str:
    """SHA-256 over the files defining the `(role, function)` pairs; functions without a
    file add their source or bytecode. Unchanged for file-defined code."""
    files: set[Path] = set()
    extra: list[bytes] = []
    for role, function in functions:
        if function is None:
            continue
        original = _unwrap(function)
        path = _file(original)
        if path is not None:
            files.add(path)
        else:
            extra.append(_source_free(role, original))
    digest = hashlib.sha256()
    for path in sorted(files, key=str):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for part in extra:
        digest.update(b"\1" + part + b"\0")
    return digest.hexdigest()


_CODE_SUFFIXES = (".py", ".so", ".pyd")
_MAX_CODE_FILES = 10_000


def analysis_code_files(path: str | Path) -> list[Path]:
    """Every file the analysis at `path` could import from its folder: the folder's (for a
    single .py file: its folder's) Python files and extension modules, in all sub-folders,
    `_private` modules and packages included; hidden folders, __pycache__ and pytest files
    (test_*.py, conftest.py, which an analysis must not import) skipped."""
    from flame.analysis.loader import analysis_files

    path = Path(path)
    files = set(analysis_files(path))  # checks that the analysis exists and is Python
    root = path.parent if path.is_file() else path
    for file in root.rglob("*"):
        parts = file.relative_to(root).parts
        if any(part.startswith(".") or part == "__pycache__" for part in parts):
            continue
        if file.name.startswith("test_") or file.name == "conftest.py":
            continue  # pytest files (an image ships without them); see README
        if file.suffix in _CODE_SUFFIXES and (file.is_file() or file.is_symlink()):
            files.add(file)
            if len(files) > _MAX_CODE_FILES:
                raise ConfigError(
                    f"analysis {path}: more than {_MAX_CODE_FILES} code files under {root}; "
                    "put the analysis in a folder of its own"
                )
    for file in files:
        _refuse_outside(file, root)
    return sorted(files)


def _refuse_outside(file: Path, root: Path) -> None:
    """A code file that is a symlink, lies under a symlinked folder, or whose real path
    leaves the analysis folder is refused, naming it: the hash and the snapshot would
    otherwise cover (and copy for the child) whatever it points at, a node key included."""

    relative = file.relative_to(root)
    current = root
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise AnalysisLoadError(
                f"analysis code file {relative} is (or lies under) a symbolic link "
                f"({current.relative_to(root)}); replace it with the file itself"
            )
    real_root = root.resolve()
    if not file.resolve().is_relative_to(real_root) or not file.is_file():
        raise AnalysisLoadError(
            f"analysis code file {relative} is not a regular file inside {root}"
        )


def analysis_code_hash(path: str | Path) -> str:
    """The SHA-256 of the analysis at `path`: over every code file it could import (by path
    relative to its folder, and content), without importing anything. What `flame hash`
    prints, nodes approve (FLAME_APPROVED_CODE), announce and the manifest records."""
    path = Path(path)
    root = path.parent if path.is_file() else path
    digest = hashlib.sha256()
    for file in analysis_code_files(path):
        name = file.relative_to(root).as_posix()
        digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()

"""Find `analyze`, `aggregate` and `converged` in a .py file or a folder of them.

A folder made by copying `templates/` works as it is: its modules are imported with the
folder on sys.path (so `from analyzer_generic import analyze` in main_generic.py works), and
the functions are collected from all of them. The same function seen twice counts once.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from flame.analysis.functions import AnalysisFunctions
from flame.errors import AnalysisLoadError

__all__ = ["LoadedAnalysis", "analysis_files", "load_analysis"]

NAMES = ("analyze", "aggregate", "converged")


@dataclass(frozen=True)
class LoadedAnalysis:
    """The analyst's functions and the files they came from (hashed into the manifest)."""

    functions: AnalysisFunctions
    files: tuple[Path, ...]

    def code_hash(self) -> str:
        digest = hashlib.sha256()
        for path in sorted(self.files):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        return digest.hexdigest()


def analysis_files(path: str | Path) -> list[Path]:
    """The files an analysis at `path` consists of, without importing them."""
    return _candidates(Path(path))


def _candidates(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".py":
            raise AnalysisLoadError(f"{path} is not a Python file (.py)")
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.glob("*.py")
            if not p.name.startswith(("test_", "_", ".")) and p.name != "conftest.py"
        )
        if not files:
            raise AnalysisLoadError(f"{path} holds no Python files")
        return files
    raise AnalysisLoadError(f"analysis {path} does not exist")


class SourceOnlyLoader(importlib.machinery.SourceFileLoader):
    """Compiles the `.py` file itself: never reads a cached `.pyc` (which no code hash
    covers) and never writes one into the analysis's folder."""

    def get_code(self, fullname: str) -> Any:
        path = self.get_filename(fullname)
        return self.source_to_code(self.get_data(path), path)


def source_only_imports(root: str | Path) -> None:
    """Imports from folders under `root` (the analysis snapshot) load `.py` source and
    extension modules only, never bytecode."""
    real = os.path.realpath(root)
    hook = importlib.machinery.FileFinder.path_hook(
        (SourceOnlyLoader, [".py"]),
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    )

    def under_root(path: str) -> Any:
        here = os.path.realpath(path or ".")
        if here != real and not here.startswith(real.rstrip(os.sep) + os.sep):
            raise ImportError("not the analysis snapshot")
        return hook(path)

    sys.path_hooks.insert(0, under_root)
    for cached in [p for p in sys.path_importer_cache if p.startswith(real)]:
        del sys.path_importer_cache[cached]


_analysis_folders: set[Path] = set()
"""Folders analyses were loaded from: their modules may be replaced, nothing else may."""


def _module_folder(module: ModuleType) -> Path | None:
    file = getattr(module, "__file__", None)
    return Path(file).resolve().parent if file else None


def _forget_analysis_modules() -> None:
    """Drop modules of earlier analyses (helpers too), so names cannot leak between them."""
    if not _analysis_folders:  # none loaded yet (every forked analysis child): resolving
        return  # each module's path would cost thousands of stat calls for nothing
    for name, module in list(sys.modules.items()):
        if module is not None and _module_folder(module) in _analysis_folders:
            del sys.modules[name]


def _installed(module: ModuleType) -> bool:
    """A module of Python, of an installed package or of flame: never to be replaced."""
    file = getattr(module, "__file__", None)
    if not file or hasattr(module, "__path__"):
        return True
    path = Path(file).resolve()
    roots = {Path(p).resolve() for k, p in sysconfig.get_paths().items() if "lib" in k}
    roots.add(Path(__file__).resolve().parents[1])  # the flame package
    return any(path.is_relative_to(root) for root in roots)


def _import(file: Path) -> ModuleType:
    name = file.stem
    existing = sys.modules.get(name)
    if existing is not None:
        if _module_folder(existing) == file.resolve().parent:
            return existing  # imported already by a sibling module of this analysis
        if _installed(existing):
            raise AnalysisLoadError(
                f"{file.name} has the name of the installed module {name!r}; rename the file"
            )
        del sys.modules[name]  # a same-named module of some other script
    spec = importlib.util.spec_from_file_location(
        name, file, loader=SourceOnlyLoader(name, str(file))
    )
    if spec is None or spec.loader is None:
        raise AnalysisLoadError(f"cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise AnalysisLoadError(f"importing {file} failed: {type(exc).__name__}: {exc}") from exc
    return module


def load_analysis(path: str | Path) -> LoadedAnalysis:
    """Import the analysis at `path` and return its functions; errors name what is missing."""
    path = Path(path)
    files = _candidates(path)
    folder = path if path.is_dir() else path.parent
    found: dict[str, tuple[Callable[..., Any], Path]] = {}
    _forget_analysis_modules()
    _analysis_folders.add(folder.resolve())
    sys.path.insert(0, str(folder.resolve()))
    writing = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # no __pycache__ in the analysis's folder (not hashed)
    try:
        for file in files:
            module = _import(file)
            for name in NAMES:
                function = getattr(module, name, None)
                if function is None:
                    continue
                if not callable(function):
                    raise AnalysisLoadError(f"{file.name}: {name} is not a function")
                previous = found.get(name)
                if previous is not None and previous[0] is not function:
                    raise AnalysisLoadError(
                        f"{name} is defined twice: in {previous[1].name} and in {file.name}"
                    )
                found.setdefault(name, (function, file))
    finally:
        sys.dont_write_bytecode = writing
        sys.path.remove(str(folder.resolve()))
    missing = [name for name in NAMES[:2] if name not in found]
    if missing:
        raise AnalysisLoadError(
            f"{path}: no {' and no '.join(missing)} function found "
            f"(looked in {', '.join(f.name for f in files)})"
        )
    functions = AnalysisFunctions.of(
        found["analyze"][0],
        found["aggregate"][0],
        found["converged"][0] if "converged" in found else None,
    )
    return LoadedAnalysis(functions, tuple(files))

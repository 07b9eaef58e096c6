"""What the analysis child may reach on the node's filesystem: the paths its Landlock domain
lets it read (`child_readable`) and the node paths carved out of them and refused by every
file request (`child_hidden_paths`, from the node's settings: `settings_paths`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flame.isolation.spawn import python_readable

__all__ = ["child_hidden_paths", "child_readable", "settings_paths"]

log = logging.getLogger(__name__)


def settings_paths(*settings: Any) -> list[Path]:
    """Every file or folder named in these settings (pydantic models, walked recursively):
    key, token, policy, roster and data paths the analysis must not open itself. The file
    named by FLAME_CONFIG is included (it may hold tokens)."""
    from pydantic import BaseModel

    found: list[Path] = []

    def walk(value: Any) -> None:
        if isinstance(value, Path):
            found.append(value)
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    for item in settings:
        walk(item)
    if os.environ.get("FLAME_CONFIG"):
        found.append(Path(os.environ["FLAME_CONFIG"]))
    return found


def child_hidden_paths(paths: Sequence[str | Path], analysis_file: str | None) -> list[str]:
    """The node paths carved out of the child's readable folders (and refused by every file
    request), minus any it needs to start (a path holding Python, flame or the analysis code
    is left visible, with a warning, once). Remembered: a simulation asks once per node and
    epoch with the same settings."""
    key = (tuple(str(p) for p in paths), analysis_file)
    known = _hidden.get(key)
    if known is None:
        if len(_hidden) >= 64:
            _hidden.clear()
        known = _hidden[key] = tuple(_hidden_paths(paths, analysis_file))
    return list(known)


_hidden: dict[tuple[tuple[str, ...], str | None], tuple[str, ...]] = {}


def _hidden_paths(paths: Sequence[str | Path], analysis_file: str | None) -> list[str]:
    needed = [sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(__file__).parents[1])]
    if analysis_file:
        needed.append(analysis_file)
    needed_real = [os.path.realpath(p) for p in needed]
    hidden: list[str] = []
    for path in paths:
        real = os.path.realpath(str(path))
        if real == os.sep:
            continue
        if any(n == real or n.startswith(real.rstrip(os.sep) + os.sep) for n in needed_real):
            log.warning("%s holds code the analysis needs: not hidden from the analysis", real)
            continue
        if real not in hidden:
            hidden.append(real)
    return hidden


def child_readable(locator: dict[str, Any]) -> list[str]:
    """What the child's domain lets it read: Python and flame (`python_readable`), plus the
    analysis code: a snapshot's folder (`flame run`), or the folder of the module defining
    `analyze` and this process's import path (functions passed from Python)."""
    if "path" in locator:
        path = Path(str(locator["path"]))
        root = str(locator.get("root") or (path if path.is_dir() else path.parent))
        return [*python_readable(), os.path.realpath(root)]
    file = locator.get("file")
    folder = [os.path.dirname(os.path.realpath(str(file)))] if file else []
    return [*python_readable(with_script_dir=True), *folder]

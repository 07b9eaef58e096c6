"""Where an isolated child finds the analysis again: a file the runtime never imports
(`AnalysisAt`), or a function's module, file and qualified name (`locate`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flame.errors import FlameError

__all__ = ["AnalysisAt", "locate", "not_isolable"]


class AnalysisAt:
    """`analyze` of the analysis at `path`, never imported into the node runtime: only the
    isolated child loads it (what `flame run` does on an analysis node), so not even the
    analysis modules' top-level code runs where the keys and tokens are."""

    __name__ = __qualname__ = "analyze"

    def __init__(self, path: str | Path) -> None:
        from flame.analysis.snapshot import take_snapshot

        self.origin = str(Path(path).resolve())
        snapshot = take_snapshot(path)  # the reviewed bytes, read-only; refuses stray bytecode
        self.path = str(snapshot.path)
        self.code = snapshot.code
        """SHA-256 of the snapshot (what `flame hash` prints for the same files)."""
        self._flame_locator = {"path": self.path, "root": str(snapshot.root)}

    def __call__(self, data: Any, epoch: int = 0, previous: Any = None) -> Any:
        raise FlameError(f"the analysis at {self.path} runs only in its isolated child")


def locate(function: Callable[..., Any]) -> dict[str, Any] | None:
    """Where the child can find `function` again (module, file, qualified name), or None
    for a lambda, a closure or code typed at a prompt. A notebook cell's function is written
    out as a file first (`cell_export`); that raises FlameError for a name it cannot copy."""
    original = getattr(function, "__wrapped__", function)
    given = getattr(original, "_flame_locator", None)
    if isinstance(given, dict):
        return given
    qualname = getattr(original, "__qualname__", "")
    module_name = getattr(original, "__module__", None)
    if not qualname or "<" in qualname or module_name is None:
        return None
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None) if module is not None else None
    if isinstance(file, str) and file.startswith("<"):  # `python -` (<stdin>), exec'd code
        file = None
    if module_name == "__main__" and not file:  # a notebook cell keeps its source
        from flame.isolation.cell_export import export_cell_function

        return export_cell_function(original)
    return {"module": module_name, "file": file, "qualname": qualname}


def not_isolable(function: Callable[..., Any]) -> str:
    """Why `function` cannot run in an isolated child, and the fix ("" when it can)."""
    try:
        if locate(function) is not None:
            return ""
    except FlameError as refused:  # a notebook name that cannot be copied: says which
        return str(refused)
    original = getattr(function, "__wrapped__", function)
    name = getattr(original, "__name__", "analyze")
    if "<" in getattr(original, "__qualname__", "<"):
        why = "it is a lambda or a nested function; define it at the top level of a .py file"
    else:
        module = sys.modules.get(getattr(original, "__module__", "") or "")
        where = getattr(module, "__file__", None) or "a prompt or notebook cell"
        why = f"it was defined in {where}, not in a file; save the analysis as a .py file"
    return (
        f"{name} cannot run isolated (the child process imports it from its file): {why} "
        "(e.g. `flame simulate analysis.py --data ...`), or pass isolate=False to "
        "flame.simulate"
    )

"""`flame init`: a runnable analysis folder from files that ship inside flame itself.

Hospitals that run analyses are often air-gapped, so the starting point may not come from
the network: the wheel carries `templates/` and `examples/` as `flame/_kit/...` and this
module copies them out with `importlib.resources`. A source checkout or an editable install
has no `_kit`; there the repository's own folders serve, so the command behaves the same
while flame is being developed.
"""

from __future__ import annotations

import importlib.resources
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flame.errors import FlameError

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

__all__ = ["ScaffoldError", "Scaffolded", "examples", "init", "kit_root"]

_SKIP_NAMES = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".DS_Store"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


class ScaffoldError(FlameError):
    """The folder cannot be written (not empty, not a folder, unknown example)."""


@dataclass(frozen=True)
class Scaffolded:
    """What `init` wrote, so the CLI can say what to run next."""

    root: Path
    files: list[Path]
    data: Path
    source: str


def kit_root() -> Traversable:
    """The folder holding `templates/` and `examples/`: packaged, else the source checkout."""
    packaged = importlib.resources.files("flame").joinpath("_kit")
    if packaged.joinpath("templates").is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "templates").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout
    raise ScaffoldError(
        "flame's templates are not installed with this copy of flame "
        "(expected flame/_kit/templates); reinstall flame from its wheel"
    )


def examples() -> list[str]:
    """Names of the examples `init --example` can write."""
    folder = kit_root().joinpath("examples")
    if not folder.is_dir():
        return []
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_dir() and entry.joinpath("analysis.py").is_file()
    )


def _files(
    folder: Traversable, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], bytes]]:
    found: list[tuple[tuple[str, ...], bytes]] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name in _SKIP_NAMES or entry.name.endswith(_SKIP_SUFFIXES):
            continue
        if entry.is_dir():
            found.extend(_files(entry, (*prefix, entry.name)))
        elif entry.is_file():
            found.append(((*prefix, entry.name), entry.read_bytes()))
    return found


def _dockerfile(code_files: list[str]) -> bytes:
    from flame import __version__

    return (
        "# The analysis image: flame's base image plus this analysis's code, never its data.\n"
        "# Build the base image first (see flame's README), then: docker build -t my-analysis .\n"
        "# Each node runs it with its own FLAME_* settings; the entry point is `flame run /app`.\n"
        f"ARG FLAME_IMAGE=flame:{__version__}\n"
        "FROM ${FLAME_IMAGE}\n"
        f"COPY {' '.join(code_files)} /app/\n"
    ).encode()


def init(dest: Path, example: str | None = None, *, force: bool = False) -> Scaffolded:
    """Write the templates (or an example) with their data into `dest`.

    A non-empty `dest` is refused unless `force`, because the user's own analysis may live
    there; with `force`, files of the same name are replaced and others are left alone.
    """
    root = kit_root()
    if example is None:
        source = root.joinpath("templates")
        what = "templates"
    else:
        names = examples()
        if example not in names:
            raise ScaffoldError(
                f"no example named {example!r}; choose one of: {', '.join(names) or '(none)'}"
            )
        source = root.joinpath("examples").joinpath(example)
        what = f"example {example}"
    if dest.exists() and not dest.is_dir():
        raise ScaffoldError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise ScaffoldError(f"{dest} is not empty; use --force to write into it anyway")
    files = _files(source)
    code = sorted(
        "/".join(parts)
        for parts, _ in files
        if len(parts) == 1 and parts[0].endswith(".py") and not parts[0].startswith("test_")
    )
    if example is None:
        # the analyst's two files; main_generic.py only matters when run without flame's CLI
        code = [name for name in code if name != "main_generic.py"] or code
    files.append((("Dockerfile",), _dockerfile(code)))
    written: list[Path] = []
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for parts, content in files:
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            written.append(target)
    except OSError as exc:
        raise ScaffoldError(f"cannot write into {dest}: {exc.strerror or exc}") from None
    return Scaffolded(dest, written, dest / "data", what)

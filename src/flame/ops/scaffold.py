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

__all__ = ["IMAGE_LABEL", "ScaffoldError", "Scaffolded", "examples", "init", "kit_root"]

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

    def next_steps(self) -> list[str]:
        """The commands to run next: an example whose nodes are described by `nodes.toml`
        (SQL, FHIR, S3 sources) is simulated with `--nodes`, after its own setup script."""
        nodes = self.root / "nodes.toml"
        if not nodes.is_file():
            return [f"flame simulate {self.root} --data {self.data}"]
        setup = self.root / "create_databases.py"
        first = [f"python {setup}"] if setup.is_file() else []
        return [*first, f"flame simulate {self.root} --nodes {nodes}"]


def kit_root() -> Traversable:
    """The folder holding `templates/` and `examples/`: packaged, else the source checkout."""
    packaged = importlib.resources.files("flame").joinpath("_kit")
    if packaged.joinpath("templates").is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[3]
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


IMAGE_LABEL = "org.flame.code-sha256"
"""The analysis image's label holding the SHA-256 of its analysis code (`flame hash`, what
FLAME_APPROVED_CODE lists and the run's manifest records), for node-side code approval."""


def _dockerfile() -> bytes:
    from flame import __version__

    return f"""\
# The analysis image: flame's base image plus this folder's top-level *.py files and the
# packages requirements.txt names; never its data, tests or secrets (see .dockerignore).
# Build flame's base image first (flame's docs: docs/how-to/containers.md), then, in this folder:
#
#     docker build --build-arg FLAME_CODE_SHA256="$(flame hash .)" -t my-analysis .
#
# The build loads the analysis and refuses a FLAME_CODE_SHA256 that is not its code's hash;
# the image carries the hash as the label {IMAGE_LABEL}, for node-side approval.
# Each node runs the image with its own FLAME_* settings; the entry point is `flame run /app`.
# A package folder of your own: add `COPY mypackage /app/mypackage` below the *.py line and
# `!mypackage` to .dockerignore, above its bytecode lines (which must stay last).
ARG FLAME_IMAGE=flame:{__version__}
FROM ${{FLAME_IMAGE}}
USER root
COPY requirements.txt /app/
RUN flame-install requirements /app/requirements.txt
USER 10001:10001
COPY *.py /app/
ARG FLAME_CODE_SHA256=
RUN flame-install code /app "${{FLAME_CODE_SHA256}}"
LABEL {IMAGE_LABEL}="${{FLAME_CODE_SHA256}}"
""".encode()


_DOCKERIGNORE = b"""\
# The analysis image's build context: top-level Python files and requirements.txt, nothing
# else (no data, no tests, no secrets). Allow more with a `!name` line.
*
!*.py
!requirements.txt
test_*.py
conftest.py
# never bytecode or .pth files, even in a folder let in above (keep these lines last): no
# code hash covers them, and `flame hash` and the nodes refuse a folder holding them
**/__pycache__
**/*.pyc
**/*.pyo
**/*.pth
"""

_REQUIREMENTS = b"""\
# Python packages this analysis needs beyond flame and its dependencies (numpy, pyarrow, ...
# are in the image already), installed into the analysis image. Pin exact versions; with a
# hash on every line (`pip hash FILE`, or pip-compile --generate-hashes) the image installs
# them with --require-hashes, e.g.
#   pandas==2.2.3 --hash=sha256:<64 hex digits>
"""


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
    shipped = {parts for parts, _ in files}
    for name, content in (
        ("Dockerfile", _dockerfile()),
        (".dockerignore", _DOCKERIGNORE),
        ("requirements.txt", _REQUIREMENTS),
    ):
        if (name,) in shipped or (name == "requirements.txt" and (dest / name).exists()):
            continue  # the example's own, or the analyst's list (never replaced, even --force)
        files.append(((name,), content))
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

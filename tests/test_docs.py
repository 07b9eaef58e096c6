"""The documentation runs as written, its reference is complete, and the site builds strictly.

Every fenced block in docs/**/*.md and README.md has a language. Blocks a user would run
(bash, sh, console, python) are executed here, page by page, in order, in a fresh folder holding
a copy of examples/ — unless the line before the block says why not:

    <!-- not-run: REASON -->                 needs infrastructure the tests cannot start here
    <!-- tested-by: tests/test_x.py -->     another test runs this block (it must name the page)

A python, toml or json block whose first line is a comment naming a file (`# analysis.py`)
is that file: it is written into the folder, not run. Everything else (text, toml, json
without a file name) is output or configuration shown to the reader; toml blocks must parse.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
RUNNABLE = {"bash", "sh", "shell", "console", "python", "py"}
README_MAX_LINES = 250
MAX_NOT_RUN = 8  # keep the blocks nobody runs few; each says why

FENCE = re.compile(r"^( {0,4})```([^\n`]*)\n(.*?)^\1```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*(not-run|tested-by):\s*(.*?)\s*-->\s*$")
FILE_LINE = re.compile(r"^(?:#|//)\s*([\w.-]+\.(?:py|toml|json|csv|txt))\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    marker: tuple[str, str] | None
    filename: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def page_blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        indent, info, body = match.group(1), match.group(2).strip(), match.group(3)
        code = "\n".join(line.removeprefix(indent) for line in body.splitlines()) + "\n"
        before = text[: match.start()].rstrip().splitlines()
        marked = MARKER.search(before[-1]) if before else None
        first = code.splitlines()[0] if code.strip() else ""
        named = FILE_LINE.match(first)
        lang = info.split()[0] if info else ""
        found.append(
            Block(
                page=page,
                line=text.count("\n", 0, match.start()) + 1,
                lang=lang,
                code=code,
                marker=(marked.group(1), marked.group(2)) if marked else None,
                filename=named.group(1)
                if named and lang in ("python", "py", "toml", "json")
                else None,
            )
        )
    return found


ALL_BLOCKS = [block for page in PAGES for block in page_blocks(page)]


def _to_run(page: Path) -> list[Block]:
    return [
        b
        for b in page_blocks(page)
        if b.marker is None and (b.filename is not None or b.lang in RUNNABLE)
    ]


def test_every_block_has_a_language() -> None:
    bare = [b.where for b in ALL_BLOCKS if not b.lang]
    assert not bare, f"fenced blocks without a language (```text for output): {bare}"


def test_every_runnable_block_is_run_or_says_why_not() -> None:
    not_run = []
    for block in ALL_BLOCKS:
        if block.marker is None:
            continue
        kind, reason = block.marker
        assert block.lang in RUNNABLE, f"{block.where}: only runnable blocks take a marker"
        assert len(reason) >= 10, f"{block.where}: `{kind}:` needs a reason, got {reason!r}"
        if kind == "tested-by":
            test = ROOT / reason.split()[0]
            assert test.is_file(), f"{block.where}: {test} does not exist"
            page = str(block.page.relative_to(ROOT))
            assert page in test.read_text(), f"{block.where}: {test.name} does not read {page}"
        else:
            not_run.append(f"{block.where}: {reason}")
    assert len(not_run) <= MAX_NOT_RUN, "too many blocks are not run:\n" + "\n".join(not_run)


def test_toml_blocks_parse() -> None:
    for block in ALL_BLOCKS:
        if block.lang == "toml":
            try:
                tomllib.loads(block.code)
            except tomllib.TOMLDecodeError as exc:
                pytest.fail(f"{block.where}: {exc}")


def test_the_policy_example_is_a_valid_policy() -> None:
    from flame.privacy.policy import NodePolicy

    page = DOCS / "how-to" / "node-policy-dp.md"
    example = next(b for b in page_blocks(page) if b.lang == "toml")
    policy = NodePolicy.model_validate(tomllib.loads(example.code))
    assert policy.epsilon_budget is not None and policy.dp_bounds


def _environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLAME_", "PYTEST"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["HOME"] = str(home)
    env["COLUMNS"] = "100"
    return env


@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if _to_run(p)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_the_page_runs_as_written(page: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(
        ROOT / "examples", work / "examples", ignore=shutil.ignore_patterns("__pycache__")
    )
    env = _environment(tmp_path)
    for block in _to_run(page):
        if block.filename is not None:
            (work / block.filename).write_text(block.code)
            continue
        if block.lang in ("python", "py"):
            command = [sys.executable, "-"]
            stdin = block.code
        else:
            command = ["bash", "-euo", "pipefail", "-c", block.code]
            stdin = ""
        done = subprocess.run(
            command,
            cwd=work,
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, (
            f"{block.where} failed with exit code {done.returncode}:\n{block.code}\n"
            f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )


# --- README ------------------------------------------------------------------------------------


def _ci_test_command() -> str:
    found = re.search(r"^TEST_COMMAND='(.*)'$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert found is not None, ".ci/run has no TEST_COMMAND='...' line"
    return found.group(1)


def test_readme_is_short_and_points_into_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    assert _ci_test_command() in readme, "README must hold .ci/run's TEST_COMMAND verbatim"
    assert "mkdocs build --strict" in _ci_test_command()
    assert "mkdocs serve" in readme
    linked = set(re.findall(r"\]\((docs/[^)#]+)", readme))
    assert linked, "README links to no docs page"
    missing = [link for link in linked if not (ROOT / link).is_file()]
    assert not missing, f"README links to pages that do not exist: {missing}"


# --- generated reference -----------------------------------------------------------------------


def _generator() -> ModuleType:
    path = DOCS / "hooks" / "reference.py"
    spec = importlib.util.spec_from_file_location("flame_docs_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_setting_is_documented() -> None:
    from flame.config import DataSourceSettings, FlameConfig
    from flame.privacy.central import AggregatorPolicy
    from flame.privacy.policy import NodePolicy

    gen = _generator()
    rows = list(gen.setting_rows(FlameConfig))
    table = gen.settings_markdown()
    assert len(rows) > 50
    for variable, _type, _default, meaning in rows:
        assert meaning, f"{variable} has no description (Field(description=...) in flame.config)"
        assert f"`{variable}`" in table
    for model, markdown in (
        (DataSourceSettings, gen.data_source_markdown()),
        (NodePolicy, gen.policy_markdown()),
        (AggregatorPolicy, gen.aggregator_policy_markdown()),
    ):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            assert f"| `{name}` |" in markdown


def test_every_cli_command_is_documented() -> None:
    from flame.cli.app import _parser

    gen = _generator()
    parsers = gen.cli_parsers()
    markdown = gen.cli_markdown()
    top = set(gen._subcommands(_parser()))
    assert {"simulate", "run", "keys", "init", "check", "status", "report"} <= top
    for command in top - set(gen.DELEGATED):
        assert f"### `flame {command}`" in markdown
    for command in ("flame keys generate", "flame keys info", "flame keys identity"):
        assert command in parsers and f"### `{command}`" in markdown
    assert "--threshold" in markdown and "--persistence-dir" in markdown


def test_the_public_api_is_documented() -> None:
    import flame

    gen = _generator()
    markdown = gen.api_markdown()
    for name in flame.__all__:
        assert f"### `flame.{name}`" in markdown
    assert "(no docstring)" not in markdown


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """What the test command's `mkdocs build --strict` does, checked here with its output."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    settings = (tmp_path / "site" / "reference" / "settings" / "index.html").read_text()
    assert "FLAME_SECURE__KEY_SHARE_FILE" in settings and "<!-- flame:" not in settings
    assert (tmp_path / "site" / "threat-model" / "index.html").is_file()

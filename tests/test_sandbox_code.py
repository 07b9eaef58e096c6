"""Issue 20: the node runs exactly the reviewed bytes (snapshot, source-only imports, stray
bytecode refused) in a real isolated child."""

from __future__ import annotations

import os
import py_compile
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

from flame.analysis.code_hash import analysis_code_hash
from flame.analysis.snapshot import take_snapshot, unreviewed_importables
from flame.data import Data
from flame.errors import AnalysisLoadError
from flame.isolation.runner import AnalysisAt, ChildRunner
from flame.node.context import Context
from flame.ops import scaffold

MAIN = """
from helper import answer

def analyze(data):
    return {"answer": answer()}

def aggregate(results):
    return results
"""


def _context() -> Context:
    return Context(
        analysis_id="snap",
        node_id="n",
        role="analysis",
        participants=["n"],
        aggregator_id="agg",
        mailbox=None,  # type: ignore[arg-type]
    )


def _folder(root: Path) -> Path:
    folder = root / "analysis"
    (folder / "pkg").mkdir(parents=True)
    (folder / "main.py").write_text(MAIN)
    (folder / "helper.py").write_text("def answer():\n    return 'reviewed'\n")
    (folder / "pkg" / "__init__.py").write_text("")
    return folder


def test_the_snapshot_is_the_hashed_files_read_only_with_the_same_hash(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "test_main.py").write_text("raise SystemExit('not part of the analysis')\n")
    snapshot = take_snapshot(folder)
    copied = sorted(p.relative_to(snapshot.root).as_posix() for p in snapshot.root.rglob("*"))
    assert copied == ["helper.py", "main.py", "pkg", "pkg/__init__.py"]
    assert snapshot.code == analysis_code_hash(folder)
    assert not os.access(snapshot.root / "helper.py", os.W_OK) or os.geteuid() == 0
    assert (snapshot.root.stat().st_mode & 0o222) == 0


@pytest.mark.parametrize(
    "planted",
    ["__pycache__/helper.cpython-311.pyc", "pkg/__pycache__/x.pyc", "evil.pth", "stray.pyc"],
)
def test_a_folder_with_unreviewed_importable_files_is_refused_by_name(
    tmp_path: Path, planted: str
) -> None:
    folder = _folder(tmp_path)
    target = folder / planted
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"\0")
    with pytest.raises(AnalysisLoadError, match="no code hash covers") as refused:
        AnalysisAt(folder)
    shown = Path(planted).parent.as_posix() if "__pycache__" in planted else planted
    assert shown in str(refused.value)
    assert unreviewed_importables(folder)


def test_the_child_imports_source_only_from_the_snapshot(tmp_path: Path) -> None:
    """Even bytecode inside the snapshot (put there behind the node's back) is never loaded:
    the child compiles the reviewed .py files themselves."""
    folder = _folder(tmp_path)
    placeholder = AnalysisAt(folder)
    root = Path(placeholder._flame_locator["root"])
    hostile = tmp_path / "hostile" / "helper.py"
    hostile.parent.mkdir()
    hostile.write_text("def answer():\n    return 'PLANTED'\n")
    os.chmod(root, 0o755)
    cache = root / "__pycache__"
    cache.mkdir()
    for name in ("helper", "main"):
        source = hostile if name == "helper" else root / "main.py"
        py_compile.compile(
            str(source),
            cfile=str(cache / f"{name}.{sys.implementation.cache_tag}.pyc"),
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            doraise=True,
        )
    os.chmod(root, 0o555)
    runner = ChildRunner(placeholder, Data({}), _context())
    try:
        assert runner.run(0, None).result == {"answer": "reviewed"}
    finally:
        runner.close()


def test_init_dockerignore_keeps_bytecode_and_pth_out_even_of_a_let_in_folder(
    tmp_path: Path,
) -> None:
    made = scaffold.init(tmp_path / "a")
    lines = [
        line
        for line in (made.root / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    # what the Dockerfile's comment tells analysts to add, above the bytecode block
    lines.insert(lines.index("**/__pycache__"), "!mypackage")

    def ignored(relative: str) -> bool:
        verdict = False
        for pattern in lines:
            negated = pattern.startswith("!")
            bare = pattern.removeprefix("!").removeprefix("**/")
            if fnmatch(relative, bare) or any(fnmatch(p, bare) for p in relative.split("/")):
                verdict = not negated
        return verdict

    assert not ignored("main.py") and not ignored("mypackage")
    for stray in ("__pycache__", "mypackage/__pycache__", "mypackage/x.pyc", "evil.pth"):
        assert ignored(stray), stray


def test_the_code_hash_refuses_a_symlinked_code_file_naming_it(tmp_path: Path) -> None:
    secret = tmp_path / "identity.key"
    secret.write_text("NODE-KEY")
    code = tmp_path / "code"
    (code / "pkg").mkdir(parents=True)
    (code / "main.py").write_text("def analyze(data):\n    return 1\n")
    (code / "notes.py").symlink_to(secret)
    with pytest.raises(AnalysisLoadError, match=r"notes\.py"):
        analysis_code_hash(code / "main.py")
    (code / "notes.py").unlink()
    (code / "pkg" / "inner").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "x.py").write_text("X = 1\n")
    analysis_code_hash(code / "main.py")  # a symlinked folder is not walked at all

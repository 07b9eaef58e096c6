"""The code hash (provenance, resume check) for analyses with no file behind them.

`python -c`, stdin and notebook cells define functions whose "source file" (`<string>`,
`<stdin>`, an IPython cell name) does not exist; with storage configured the run used to
die with FileNotFoundError while hashing it. Now such code is hashed by its source text
(when Python kept it) or its bytecode, the same in every process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import linecache
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from flame.analysis.functions import AnalysisFunctions
from flame.main import code_hash

SCRIPT = """
import json, sys
import flame

def analyze(data):
    return {"n": len(data.read_csv("values.csv")["x"])}

def aggregate(results):
    return {"total": sum(r["n"] for r in results.values()) + OFFSET}

result = flame.simulate(analyze, aggregate, data=sys.argv[1], epochs=1)
print(json.dumps(result.value))
"""


def _data(tmp_path: Path) -> Path:
    for node in ("a", "b"):
        (tmp_path / "data" / node).mkdir(parents=True)
        (tmp_path / "data" / node / "values.csv").write_text("x\n1\n2\n")
    return tmp_path / "data"


def _run(
    tmp_path: Path, script: str, seed: str, *, stdin: bool = False
) -> tuple[dict[str, int], str]:
    results = tmp_path / f"results-{len(list(tmp_path.glob('results-*')))}"
    env = {**os.environ, "FLAME_STORAGE__RESULTS_DIR": str(results), "PYTHONHASHSEED": seed}
    env.pop("FLAME_ANALYSIS_ID", None)
    data = str(tmp_path / "data" if (tmp_path / "data").exists() else _data(tmp_path))
    command = [sys.executable, "-", data] if stdin else [sys.executable, "-c", script, data]
    done = subprocess.run(
        command,
        input=script if stdin else None,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    manifests = list(results.rglob("manifest.json"))
    assert len(manifests) == 1, manifests
    final = json.loads(done.stdout.strip().splitlines()[-1])
    return final, str(json.loads(manifests[0].read_text())["code_sha256"])


def test_an_analysis_from_python_c_runs_with_storage_and_hashes_deterministically(
    tmp_path: Path,
) -> None:
    script = "OFFSET = 0\n" + SCRIPT
    final, first = _run(tmp_path, script, "1")
    assert final == {"total": 4}
    _, again = _run(tmp_path, script, "2")  # another process, other hash randomization
    assert again == first
    _, changed = _run(tmp_path, "OFFSET = 1\n" + SCRIPT.replace("+ OFFSET", "+ 1"), "1")
    assert changed != first


def test_an_analysis_piped_on_stdin_runs_with_storage(tmp_path: Path) -> None:
    final, digest = _run(tmp_path, "OFFSET = 0\n" + SCRIPT, "3", stdin=True)
    assert final == {"total": 4} and len(digest) == 64


def _notebook_cell(tmp_path: Path, source: str, name: str) -> ModuleType:
    """What a notebook leaves behind: functions whose file name does not exist on disk, with
    the cell's text kept in linecache (here: imported from a file that is then removed)."""
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path.unlink()
    linecache.cache[str(path)] = (len(source), None, source.splitlines(True), str(path))
    return module


def test_notebook_cells_hash_their_source_text(tmp_path: Path) -> None:
    cell = "def analyze(data):\n    return 1\n\ndef aggregate(results):\n    return sum(results)\n"
    first = _notebook_cell(tmp_path, cell, "cell_1")
    same = _notebook_cell(tmp_path, cell, "cell_2")
    other = _notebook_cell(tmp_path, cell.replace("return 1", "return 2"), "cell_3")

    def digest(cell: ModuleType) -> str:
        return code_hash(AnalysisFunctions.of(cell.analyze, cell.aggregate))

    assert digest(first) == digest(same)
    assert digest(first) != digest(other)


def test_file_defined_code_keeps_its_file_hash(tmp_path: Path) -> None:
    """Stored runs made before this change must still resume: a file's hash is unchanged."""
    path = tmp_path / "my_analysis.py"
    path.write_text("def analyze(data):\n    return 1\n\ndef aggregate(results):\n    return 0\n")
    spec = importlib.util.spec_from_file_location("my_analysis", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = hashlib.sha256(b"my_analysis.py\0" + path.read_bytes() + b"\0").hexdigest()
    assert code_hash(AnalysisFunctions.of(module.analyze, module.aggregate)) == expected

"""flame from a Jupyter notebook and from `python -`: the two places without a main file.

The notebook runs in a real IPython kernel (nbclient + ipykernel): a plain and a secure
`flame.simulate` whose vectors are large enough to use the Paillier worker processes. Its
outputs are checked, no cell errs, nothing prints a traceback (not even the kernel's
shutdown, whose stderr this test captures), and the workers are gone afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="one core: flame starts no Paillier worker processes"
)

SETUP = """\
import logging, sys
import numpy as np
import flame
from flame.protocols.paillier import pool
logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
N = 20_000  # values per node: enough ciphertexts for the worker processes

def analyze(data):
    x = np.asarray(data.read_csv()["v"])
    return {"n": int(x.size), "total": float(x.sum()),
            "big": flame.secure(np.full(N, float(x.sum()))),
            "s": flame.secure(float(x.sum()))}

def aggregate(results):
    out = {"n": sum(r["n"] for r in results.values())}
    if results.secure:
        out["big0"] = float(results.secure["big"][0])
        out["s"] = results.secure["s"]
        out["s_type"] = type(results.secure["s"]).__name__
    else:
        out["total"] = sum(r["total"] for r in results.values())
    return out

DATA = {"a": {"x.csv": "v\\n1\\n2\\n"}, "b": {"x.csv": "v\\n4\\n"}}
"""

PLAIN = """\
plain = flame.simulate(lambda data: {"n": analyze(data)["n"], "total": analyze(data)["total"]},
                       aggregate, data=DATA)
print("plain", plain.value)
"""

SECURE = """\
secure = flame.simulate(analyze, aggregate, data=DATA, secure=True)
print("secure", secure.value)
print("workers", sorted(w.process.pid for p in pool._PROCESS_POOLS.values() for w in p._all))
"""


def _texts(cell: object) -> str:
    return "".join(out.get("text", "") for out in cell.outputs)  # type: ignore[attr-defined]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited already
        return stat.read().split(") ")[-1][:1] != "Z"


def test_simulate_plain_and_secure_in_a_jupyter_kernel(capfd: pytest.CaptureFixture[str]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (SETUP, PLAIN, SECURE)]
    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": os.getcwd()}}
    )
    client.execute()  # raises CellExecutionError if a cell fails; shuts the kernel down
    outputs = [_texts(cell) for cell in nb.cells]
    assert "plain {'n': 3, 'total': 7.0}" in outputs[1]
    assert "secure {'n': 3, 'big0': 7.0, 's': 7.0, 's_type': 'float'}" in outputs[2]
    pids = [int(p) for p in outputs[2].split("workers [")[1].split("]")[0].split(", ") if p]
    assert pids, "the secure run did not use the worker processes"
    for cell in nb.cells:
        for out in cell.outputs:
            assert out.output_type != "error", out
            assert "Traceback" not in out.get("text", ""), out
            assert "worker processes failed" not in out.get("text", ""), out
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids), "worker processes outlived the kernel"
    captured = capfd.readouterr()  # the kernel's own stdout/stderr, including its shutdown
    assert "Traceback" not in captured.err + captured.out
    assert "KeyboardInterrupt" not in captured.err + captured.out


STDIN_SCRIPT = """\
import logging, sys
import numpy as np
import flame
from flame.protocols.paillier import pool
logging.basicConfig(stream=sys.stderr, level=logging.DEBUG, format="%(name)s %(message)s")

def analyze(data):
    return {"v": flame.secure(np.arange(20_000, dtype=float) / 1000)}

def aggregate(results):
    return results.secure["v"]

result = flame.simulate(analyze, aggregate, data={"a": {"x": "1"}, "b": {"x": "2"}},
                        secure=True)
assert np.allclose(result.value, 2 * np.arange(20_000) / 1000, atol=1e-4)
print("workers", sum(len(p._all) for p in pool._PROCESS_POOLS.values()))
"""


def test_python_stdin_uses_the_worker_processes(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-"],
        input=STDIN_SCRIPT,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "started Paillier worker process" in done.stderr
    assert int(done.stdout.split("workers")[1]) >= 1
    for bad in ("Traceback", "BrokenProcessPool", "worker processes failed", "KeyboardInterrupt"):
        assert bad not in done.stderr, done.stderr[-2000:]


ISOLATED_ANALYSIS = """\
import numpy as np
import flame

def analyze(data):
    x = np.asarray(data.read_csv()["v"])
    return {"n": int(x.size), "total": float(x.sum())}

def analyze_secure(data):
    x = np.asarray(data.read_csv()["v"])
    return {"n": int(x.size), "s": flame.secure(float(x.sum()))}

def aggregate(results):
    out = {"n": sum(r["n"] for r in results.values())}
    if results.secure:
        out["total"] = float(results.secure["s"])
    else:
        out["total"] = sum(r["total"] for r in results.values())
    return out
"""

ISOLATED_CELLS = (
    """\
import logging, sys, threading
import flame
from nb_analysis import analyze, analyze_secure, aggregate
logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
""",
    """\
inproc = flame.simulate(analyze, aggregate, data="nodes")
print("inproc", inproc.value)
""",
    """\
iso = flame.simulate(analyze, aggregate, data="nodes", isolate=True)
print("isolated", iso.value, iso.value == inproc.value)
""",
    """\
sec = flame.simulate(analyze_secure, aggregate, data="nodes", isolate=True, secure=True)
print("isolated-secure", sec.value, sec.value == inproc.value)
""",
    """\
again = flame.simulate(analyze, aggregate, data="nodes", isolate=True)  # the warm server
print("again", again.value == inproc.value, threading.active_count() < 50)
""",
)


def test_isolated_simulate_in_a_jupyter_kernel(tmp_path, capfd: pytest.CaptureFixture[str]) -> None:
    """isolate=True (plain and secure) from a kernel that holds ZeroMQ sockets and threads:
    finishes (a hang fails at the cell timeout), agrees with in-process, no traceback."""
    (tmp_path / "nb_analysis.py").write_text(ISOLATED_ANALYSIS)
    outputs = _run_isolated_cells(ISOLATED_CELLS, tmp_path, capfd)
    assert "inproc {'n': 5, 'total': 31.0}" in outputs[1]
    assert "isolated {'n': 5, 'total': 31.0} True" in outputs[2]
    assert "isolated-secure {'n': 5, 'total': 31.0} True" in outputs[3]
    assert "again True True" in outputs[4]


def _run_isolated_cells(
    cells: tuple[str, ...], tmp_path, capfd: pytest.CaptureFixture[str]
) -> list[str]:
    """Run `cells` in a real kernel beside three nodes' data; every cell's text, after
    checking that no cell erred and nothing (not even the kernel) printed a traceback."""
    for node, rows in {"a": "v\n1\n2\n", "b": "v\n4\n", "c": "v\n8\n16\n"}.items():
        (tmp_path / "nodes" / node).mkdir(parents=True)
        (tmp_path / "nodes" / node / "x.csv").write_text(rows)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # a hang fails at the cell timeout
    for cell in nb.cells:
        for out in cell.outputs:
            assert out.output_type != "error", out
            for bad in ("Traceback", "ZMQError", "non-socket"):
                assert bad not in out.get("text", ""), out
    captured = capfd.readouterr()
    for bad in ("Traceback", "ZMQError", "non-socket"):
        assert bad not in captured.err + captured.out
    return [_texts(cell) for cell in nb.cells]


CELL_DEFINED = (
    """\
import logging, sys
import numpy as np
import flame
logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
SCALE = np.float64(2.0)
OFFSETS = np.zeros(1)
""",
    """\
def scaled(x):
    return x * SCALE + OFFSETS[0]

def analyze(data):
    x = np.asarray(data.read_csv()["v"])
    return {"n": int(x.size), "total": float(scaled(x).sum())}

def analyze_secure(data):
    x = np.asarray(data.read_csv()["v"])
    return {"n": int(x.size), "s": flame.secure(float(scaled(x).sum()))}

def aggregate(results):
    out = {"n": sum(r["n"] for r in results.values())}
    if results.secure:
        out["total"] = float(results.secure["s"])
    else:
        out["total"] = sum(r["total"] for r in results.values())
    return out
""",
    """\
inproc = flame.simulate(analyze, aggregate, data="nodes")
iso = flame.simulate(analyze, aggregate, data="nodes", isolate=True)
sec = flame.simulate(analyze_secure, aggregate, data="nodes", isolate=True, secure=True)
print("cells", inproc.value, iso.value == inproc.value, sec.value == inproc.value)
""",
    """\
WEIGHTS = np.array([object(), object()])
def analyze_w(data):
    return {"n": len(WEIGHTS)}
try:
    flame.simulate(analyze_w, aggregate, data="nodes", isolate=True)
except flame.FlameError as refused:
    print("refused", "'WEIGHTS'" in str(refused), "isolate=False" in str(refused))
""",
)


def test_functions_defined_in_notebook_cells_run_isolated(
    tmp_path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The way a notebook is written: analyze, its helpers and constants typed into cells.
    isolate=True exports them as a file for the child (no fork of the kernel), agrees with
    the in-process run, plain and secure; a name that cannot be copied is refused by name."""
    outputs = _run_isolated_cells(CELL_DEFINED, tmp_path, capfd)
    assert "cells {'n': 5, 'total': 62.0} True True" in outputs[2]
    assert "refused True True" in outputs[3]

"""Red team: code approval on the node (issue 9, item 4).

The operator reviews an analysis and approves its hash (`flame hash ANALYSIS`). The attacker
(the analyst) then changes what the analysis does without changing that hash: by editing a
module the approved code imports. A node given such code must refuse it before any data is
read (exit 2), like any other unapproved code.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from broker import Broker, have_mosquitto
from nodes import NodeProcess, federation_env, node_env

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")

MAIN = """
from {module} import compute

def analyze(data):
    return compute(data)

def aggregate(results):
    return results
"""

BENIGN = "def compute(data):\n    return {'n': len(data.files())}\n"
HOSTILE = "def compute(data):\n    return {'rows': data.read_text('x.csv')}\n"


def _hash(analysis: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "flame", "hash", str(analysis)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0 and "invalid choice" in done.stderr:
        pytest.skip("flame hash is not available (code approval not present)")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split()[-1]


def _node_with_approval(
    broker: Broker, tmp_path: Path, analysis: Path, approved: str
) -> NodeProcess:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "x.csv").write_text("v\n1\n")
    env = federation_env(broker, f"approval-{time.monotonic_ns()}", ["node-0"])
    own = node_env(
        env, "node-0", data_dir=data, FLAME_APPROVED_CODE=approved, FLAME_PRESENCE_TIMEOUT="5"
    )
    return NodeProcess("node-0", ["run", str(analysis)], own, tmp_path / "logs")


def _verdict(node: NodeProcess, timeout: float = 90) -> str:
    """'approved' once the node says so, 'refused' if it exits 2 first (then it is killed)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if "is approved on this node" in node.stderr():
                return "approved"
            if node.returncode is not None:
                return "refused" if node.returncode == 2 else f"exit {node.returncode}"
            time.sleep(0.2)
        raise AssertionError(f"no verdict within {timeout:g} s:\n{node.tail()}")
    finally:
        node.kill()


def test_control_the_approved_code_itself_runs(mqtt_broker: Broker, tmp_path: Path) -> None:
    """Without this, a node that refuses everything would pass the tests below."""
    folder = tmp_path / "analysis"
    folder.mkdir()
    (folder / "analysis.py").write_text(MAIN.format(module="helper"))
    (folder / "helper.py").write_text(BENIGN)
    node = _node_with_approval(mqtt_broker, tmp_path, folder, _hash(folder))
    assert _verdict(node) == "approved", node.tail()


_BYPASS = pytest.mark.xfail(
    strict=True,
    reason="open (issue 9): the approved hash covers only the top-level *.py files not "
    "starting with _ or test_ (a single file: only itself), but the child imports anything "
    "in the analysis folder: _modules, packages, a single file's sibling modules",
)


@pytest.mark.parametrize(
    ("layout", "module"),
    [
        ("folder", "helper"),  # analysis/helper.py beside analysis/analysis.py
        pytest.param("folder", "_helper", marks=_BYPASS),  # a "private" module
        pytest.param("folder", "lib.impl", marks=_BYPASS),  # a package inside the folder
        pytest.param("file", "helper", marks=_BYPASS),  # a module beside a single file
    ],
)
def test_changing_an_imported_module_changes_the_approved_hash(
    mqtt_broker: Broker, tmp_path: Path, layout: str, module: str
) -> None:
    folder = tmp_path / "analysis"
    target = folder / (module.replace(".", "/") + ".py")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.parent != folder:
        (target.parent / "__init__.py").write_text("")
    (folder / "analysis.py").write_text(MAIN.format(module=module))
    target.write_text(BENIGN)
    analysis = folder if layout == "folder" else folder / "analysis.py"
    approved = _hash(analysis)
    target.write_text(HOSTILE)  # after review and approval
    node = _node_with_approval(mqtt_broker, tmp_path, analysis, approved)
    verdict = _verdict(node)
    assert verdict == "refused", f"the changed code ran under the approved hash:\n{node.tail()}"
    assert "not approved" in node.stderr()

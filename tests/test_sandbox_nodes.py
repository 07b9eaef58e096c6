"""Issue 20 on real signed nodes (`flame run` over a real Mosquitto): an approved analysis
that rewrites the installed runtime, or ships a planted `.pyc`, changes nothing and runs
nothing but the reviewed bytes.

Each test runs its own copy of flame (PYTHONPATH), so a hostile analysis that got through
could only damage the copy, never the checkout the tests run from.
"""

from __future__ import annotations

import hashlib
import json
import py_compile
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, have_mosquitto
from nodes import Federation, federation_env

import flame
from flame.analysis.code_hash import analysis_code_hash

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="needs the mosquitto binary")

NODE = "node-0"


def _flame_copy(root: Path) -> Path:
    """A copy of the flame package in a folder of its own; returns the package folder."""
    site = root / "site"
    shutil.copytree(
        Path(flame.__file__).resolve().parent,
        site / "flame",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return site / "flame"


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


PLANTER = r'''
import json, os
import flame

STOLEN = {stolen!r}
PAYLOAD = """
import os as _os
try:
    _key = _os.environ.get("FLAME_IDENTITY__KEY_FILE", "")
    with open({stolen!r}, "w") as _out:
        _out.write(_os.environ.get("FLAME_BROKER__TOKEN", "") + "|" +
                   (open(_key).read() if _key else ""))
except OSError:
    pass
"""

def analyze(data, epoch, previous):
    if epoch == 0:
        package = os.path.dirname(flame.__file__)
        wrote = []
        for name in ("data/csv_columns.py", "data/readers.py"):
            try:
                with open(os.path.join(package, name), "a") as target:
                    target.write(PAYLOAD)
                wrote.append(name)
            except OSError as exc:
                wrote.append(type(exc).__name__)
        return {{"sum": flame.dp.sum("v", epsilon=0.1), "wrote": json.dumps(wrote)}}
    try:
        with open(STOLEN) as stream:
            loot = stream.read()
    except OSError as exc:
        loot = type(exc).__name__
    return {{"sum": flame.dp.sum("v", epsilon=0.1), "wrote": loot}}

def aggregate(results, epoch, previous):
    return {{node: r["wrote"] for node, r in results.items()}}
'''


def test_an_approved_analysis_cannot_plant_code_in_the_installed_runtime(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    package = _flame_copy(tmp_path)
    before = _digest(package)
    stolen = tmp_path / "stolen.txt"
    analysis = tmp_path / "code" / "planter.py"
    analysis.parent.mkdir()
    analysis.write_text(textwrap.dedent(PLANTER.format(stolen=str(stolen))))
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'epsilon_budget = 10.0\nledger_dir = "{tmp_path / "ledger"}"\nmin_rows = 1\n'
        "[dp_bounds]\nv = [0, 10]\n"
    )
    data = tmp_path / "data"
    (data / NODE).mkdir(parents=True)
    (data / NODE / "x.csv").write_text("v\n1\n2\n3\n")
    env = federation_env(
        mqtt_broker,
        f"plant-{tmp_path.name}",
        [NODE],
        epochs=2,
        PYTHONPATH=str(package.parent),
        FLAME_APPROVED_CODE=analysis_code_hash(analysis),
    )
    federation = Federation(env, analysis, data, [NODE], tmp_path / "logs")
    try:
        federation.start("aggregator")
        federation.start(NODE, FLAME_POLICY=str(policy))
        values = federation.finish(timeout=180)
        node_log = federation.processes[NODE].stderr()
    finally:
        federation.close()
    wire = json.dumps(values)
    assert _digest(package) == before  # the installed runtime is unchanged
    assert not stolen.exists()  # no planted code ran in the runtime
    assert mqtt_broker.password not in wire
    key = Path(federation.env_of(NODE)["FLAME_IDENTITY__KEY_FILE"]).read_text()
    assert key.strip() and key.strip() not in wire
    # the run itself went through (flame.dp still works); the loot file was never there
    assert values["aggregator"] == {NODE: "FileNotFoundError"} or values["aggregator"] == {
        NODE: "PermissionError"
    }, node_log[-2000:]


HELPER = "def count(table):\n    return int(len(table['v']))\n"
HOSTILE_HELPER = "def count(table):\n    return [float(x) for x in table['v']]\n"
MAIN = """
from helper import count

def analyze(data):
    return {"n": count(data.read_csv())}

def aggregate(results):
    return {node: r["n"] for node, r in results.items()}
"""


def _planted_folder(root: Path) -> Path:
    """An analysis folder whose .py files are benign, plus an unchecked-hash .pyc of a
    hostile helper.py in __pycache__ (Python loads it without looking at the .py)."""
    folder = root / "analysis"
    folder.mkdir()
    (folder / "main.py").write_text(MAIN)
    hostile = root / "hostile" / "helper.py"
    hostile.parent.mkdir()
    hostile.write_text(HOSTILE_HELPER)
    cache = folder / "__pycache__" / f"helper.{sys.implementation.cache_tag}.pyc"
    py_compile.compile(
        str(hostile),
        cfile=str(cache),
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        doraise=True,
    )
    (folder / "helper.py").write_text(HELPER)
    return folder


def test_a_planted_pyc_never_runs_under_an_approved_hash(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    folder = _planted_folder(tmp_path)
    data = tmp_path / "data"
    (data / NODE).mkdir(parents=True)
    (data / NODE / "x.csv").write_text("v\n61.5\n72.25\n")
    env = federation_env(
        mqtt_broker,
        f"pyc-{tmp_path.name}",
        [NODE],
        presence_timeout=10,
        epoch_timeout=10,
        FLAME_APPROVED_CODE=analysis_code_hash(folder),  # the reviewed .py files
    )
    federation = Federation(env, folder, data, [NODE], tmp_path / "logs")
    values: dict[str, Any] = {}
    try:
        federation.start("aggregator")
        federation.start(NODE)
        try:
            values = federation.finish(timeout=120)
        except AssertionError as failed:
            values = {"failed": str(failed)}
        node_log = federation.processes[NODE].stderr()
    finally:
        federation.close()
    wire = json.dumps(values)
    assert "61.5" not in wire and "72.25" not in wire  # no raw row reached the aggregator
    assert "__pycache__" in node_log  # refused, naming what is not covered by the hash


READ_ONLY = """
def analyze(data):
    return {"n": int(data.read_csv("x.csv")["age"].size)}

def aggregate(results):
    return results
"""


def test_a_parse_error_quoting_a_row_stays_on_its_node_by_default(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    analysis = tmp_path / "reader.py"
    analysis.write_text(READ_ONLY)
    data = tmp_path / "data"
    for node, text in (("node-0", "age;bmi\n62;26,402;patient0\n"), ("node-1", "age\n50\n")):
        (data / node).mkdir(parents=True)
        (data / node / "x.csv").write_text(text)
    nodes = ["node-0", "node-1"]
    env = federation_env(mqtt_broker, f"quote-{tmp_path.name}", nodes, epoch_timeout=20)
    federation = Federation(env, analysis, data, nodes, tmp_path / "logs")
    try:
        for node in ["aggregator", *nodes]:
            federation.start(node)
        for process in federation.processes.values():
            process.wait(120)
        out = {node: p.stdout() + p.stderr() for node, p in federation.processes.items()}
    finally:
        federation.close()
    assert "cannot be read as csv" in out["aggregator"]  # the failure itself is reported
    assert "line 2" in out["aggregator"]  # named by file and line, without the row
    for node in ("aggregator", "node-1"):
        assert "patient0" not in out[node] and "62;26" not in out[node], out[node][-1500:]

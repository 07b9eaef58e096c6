"""The docs' production recipe runs as written: `flame federation init` makes the kit (roster,
identities, broker config from the roster), its run.sh five processes.

The bash block under "## The recipe" is taken from docs/tutorial/production.md itself (marked
there `<!-- tested-by: tests/test_readme_recipe.py -->`), so the page cannot drift from what
works. The only change is the broker port (1883 may be taken on a developer's
or CI machine by a system Mosquitto): a free one instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from broker import free_port

PAGE = Path(__file__).resolve().parents[1] / "docs" / "tutorial" / "production.md"


def _recipe() -> str:
    text = PAGE.read_text()
    start = text.index("## The recipe")
    match = re.compile(r"```bash\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"no bash block after '## The recipe' in {PAGE}"
    return match.group(1)


def _mosquitto() -> str | None:
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


@pytest.mark.skipif(_mosquitto() is None, reason="the recipe runs Mosquitto; none installed")
def test_the_production_recipe_runs_as_written(tmp_path: Path) -> None:
    script = _recipe()
    assert script.count("1883") >= 1, "the recipe no longer names the broker port"
    (tmp_path / "recipe.sh").write_text(script.replace("1883", str(free_port())))
    bindir = str(Path(sys.executable).parent)  # this environment's `flame`
    mosquitto_dir = str(Path(_mosquitto() or "").parent)
    env = {
        "PATH": os.pathsep.join([bindir, mosquitto_dir, os.environ.get("PATH", "")]),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
    }
    process = subprocess.Popen(
        ["bash", "recipe.sh"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # the recipe leaves its broker running: stopped below
    )
    try:
        output, _ = process.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-4000:]
    kit = tmp_path / "fed"
    outs = sorted((kit / "out").glob("clinic-*.json"))
    assert [o.name for o in outs] == ["clinic-a.json", "clinic-b.json", "clinic-c.json"]
    results = {o.read_text() for o in outs} | {(kit / "out" / "aggregator.json").read_text()}
    assert len(results) == 1 and results != {""}, f"the nodes disagree: {results}"
    assert results.pop().strip() in output  # what the recipe's `cat` showed
    roster = (kit / "roster.toml").read_text()
    assert roster.count("[[member]]") == 4, roster
    assert sorted((kit / "broker" / "tokens").iterdir()) == [
        kit / "broker" / "tokens" / f"{n}.token"
        for n in ("aggregator", "clinic-a", "clinic-b", "clinic-c")
    ]
    for node in ("clinic-a", "clinic-b", "clinic-c"):  # signed, approved, as the recipe says
        log = (kit / "logs" / f"{node}.log").read_text()
        assert "is approved on this node" in log and "roster" in log, log[-2000:]
    # the pooled mean of the CSV files the recipe gives the three clinics (node_1 twice)
    folders = {"clinic-a": "node_1", "clinic-b": "node_2", "clinic-c": "node_1"}
    data = tmp_path / "my-analysis" / "data"
    pooled = [
        float(line)
        for folder in folders.values()
        for line in (data / folder / "values.csv").read_text().split()[1:]
    ]
    result = json.loads(outs[0].read_text())
    assert result["count"] == len(pooled)
    assert result["mean"] == pytest.approx(sum(pooled) / len(pooled))

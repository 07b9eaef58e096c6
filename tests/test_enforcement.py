"""An analysis that attacks the rules from inside its own process changes nothing: the
policy is enforced by the node runtime, in another process, on what comes back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flame
from flame.analysis.loader import load_analysis

TAMPER = """
import os
import numpy as np
import flame
import flame.config
import flame.privacy.disclosure
import flame.privacy.release
import flame.isolation.runner
import flame.privacy.policy

CONFIG = flame.load_config()  # what the child can learn of the node's settings


def analyze(data, epoch):
    rows = data.read_csv()["v"].size
    # 1. environment: point the policy at a permissive file, drop the rules
    os.environ["FLAME_POLICY"] = "/nonexistent/permissive.toml"
    os.environ["FLAME_SECURE__PRIVATE_KEY_FILE"] = "/dev/null"
    # 2. flame's config and policy objects
    flame.privacy.policy.NodePolicy.model_fields["min_cell_count"].default = None
    # 3. monkeypatch the enforcement code
    flame.privacy.disclosure.apply_cell_rule = lambda values, **kw: (values, 0)
    flame.privacy.release.Gate.release = lambda self, epoch, outcome: outcome
    flame.isolation.runner.RowMeter.file = lambda *a, **k: None
    # 4. try to reach the key files through flame
    attempts = []
    for name in ("../keys/private_key.json", KEY_FILE):
        try:
            attempts.append(data.read_text(name))
        except Exception as exc:
            attempts.append(type(exc).__name__)
    return {
        "table": flame.counts(np.array([3, 50], dtype=np.int64)),
        "key_setting": str(CONFIG.secure.private_key_file),
        "policy_setting": str(CONFIG.policy),
        "attempts": attempts,
        "rows": int(rows),
    }

def aggregate(results, epoch):
    return {node: {k: (np.ma.filled(v, -1) if k == "table" else v) for k, v in r.items()}
            for node, r in results.items()}
"""


def test_tampering_analysis_cannot_switch_the_rules_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    key_file = keys / "private_key.json"
    key_file.write_text('{"secret": "KEY-MATERIAL-0123456789"}')
    monkeypatch.setenv("FLAME_SECURE__PRIVATE_KEY_FILE", str(key_file))
    (tmp_path / "tamper.py").write_text(f"KEY_FILE = {str(key_file)!r}\n" + TAMPER)
    node_dir = tmp_path / "data" / "n1"
    node_dir.mkdir(parents=True)
    (node_dir / "x.csv").write_text("v\n" + "1\n" * 12)
    f = load_analysis(tmp_path / "tamper.py").functions
    policy = flame.NodePolicy(min_cell_count=5, min_rows=10)

    value: Any = flame.simulate(
        f.analyze, f.aggregate, data=tmp_path / "data", epochs=2, policy=policy, isolate=True
    ).value["n1"]
    assert np.asarray(value["table"]).tolist() == [-1, 50]  # the 3 was still suppressed
    assert value["key_setting"] == "None" and value["policy_setting"] == "None"
    assert value["attempts"] == ["DataError", "DataError"]
    assert "KEY-MATERIAL" not in repr(value)

    # the monkeypatched row meter lived in the child only: min_rows still holds
    (node_dir / "x.csv").write_text("v\n1\n2\n")
    with pytest.raises(flame.RunFailed, match="min_rows"):
        flame.simulate(f.analyze, f.aggregate, data=tmp_path / "data", policy=policy, isolate=True)


TOP_LEVEL = """
import os
try:
    with open({log!r}, "a") as out:  # runs wherever this module is imported
        out.write(f"{{os.getpid()}} {{os.environ.get('FLAME_ROLE')}} "
                  f"{{'FLAME_BROKER__TOKEN' in os.environ}}\\n")
except PermissionError:  # the node's analysis child: it may write its scratch folder only
    pass

def analyze(data):
    return {{"n": int(data.read_csv()["v"].size)}}

def aggregate(results):
    return sum(r["n"] for r in results.values())
"""


def test_flame_run_never_imports_the_analysis_into_the_node_runtime(
    mqtt_broker: Any, tmp_path: Path
) -> None:
    import json
    import os
    import subprocess
    import sys

    log = tmp_path / "imports.log"
    (tmp_path / "analysis.py").write_text(TOP_LEVEL.format(log=str(log)))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.csv").write_text("v\n1\n2\n3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAME_")}
    env.update(
        FLAME_ANALYSIS_ID=f"toplevel-{os.getpid()}",
        FLAME_PARTICIPANTS="node-0",
        FLAME_BROKER__URL=mqtt_broker.url,
        FLAME_BROKER__TOKEN=mqtt_broker.password,
        FLAME_PRESENCE_TIMEOUT="60",
        FLAME_EPOCH_TIMEOUT="60",
    )
    roles = {
        "aggregator": {"FLAME_ROLE": "aggregation"},
        "node-0": {"FLAME_ROLE": "analysis", "FLAME_DATA_DIR": str(tmp_path / "data")},
    }
    from identities import federation

    signed = federation(tmp_path / "ids", ["node-0"])  # production runs are signed
    processes = {
        node: subprocess.Popen(
            [sys.executable, "-m", "flame", "run", str(tmp_path / "analysis.py")],
            env={**env, "FLAME_NODE_ID": node, **signed[node], **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for node, extra in roles.items()
    }
    outputs = {}
    for node, process in processes.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-2000:]
        outputs[node] = json.loads(out.strip().splitlines()[-1])
    assert outputs["aggregator"] == 3
    lines = sorted(line.split() for line in log.read_text().splitlines())
    node_pid = str(processes["node-0"].pid)
    # imported by the aggregator (which runs aggregate in-process) and by node-0's child
    # (which may not write the log: its domain lets it write its scratch folder only; the
    # result above is its work), never by node-0's runtime: no line with its pid, its role
    # or its token
    assert sorted(line[1:] for line in lines) == [["aggregation", "True"]]
    assert all(line[0] != node_pid for line in lines)

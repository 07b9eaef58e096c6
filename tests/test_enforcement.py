"""An analysis that attacks the rules from inside its own process changes nothing: the
policy is enforced by the node runtime, in another process, on what comes back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flame
from flame.loader import load_analysis

TAMPER = """
import os
import numpy as np
import flame
import flame.config
import flame.disclosure
import flame.federated.release
import flame.isolation.runner
import flame.policy

CONFIG = flame.load_config()  # what the child can learn of the node's settings


def analyze(data, epoch):
    rows = data.read_csv()["v"].size
    # 1. environment: point the policy at a permissive file, drop the rules
    os.environ["FLAME_POLICY"] = "/nonexistent/permissive.toml"
    os.environ["FLAME_SECURE__PRIVATE_KEY_FILE"] = "/dev/null"
    # 2. flame's config and policy objects
    flame.policy.NodePolicy.model_fields["min_cell_count"].default = None
    # 3. monkeypatch the enforcement code
    flame.disclosure.apply_cell_rule = lambda values, **kw: (values, 0)
    flame.federated.release.Gate.release = lambda self, epoch, outcome: outcome
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

"""Threshold mode in one flag: `flame simulate --secure threshold[:T]` and
`flame.simulate(secure="threshold:T")` deal throwaway shares in process (issue 23, item 4).

The sums go through the real threshold protocol (endorsements, partial decryptions by T
share holders, combined at the aggregator) and equal the plaintext run's.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import flame
from flame.errors import ConfigError
from flame.secure.simulation_keys import SecureMode, parse_secure

ANALYSIS = """\
import flame

def analyze(data, epoch):
    values = [float(v) for v in data.read_text("x.txt").split()]
    return {"total": flame.secure(values), "count": flame.secure(len(values), precision=0)}

def aggregate(results):
    return {"total": [round(v, 3) for v in results.secure["total"]],
            "count": results.secure["count"], "who": results.contributors["total"]}
"""
DATA = {n: {"x.txt": f"{i + 1.5} {-2.25 * i} {10 * i}"} for i, n in enumerate("abc")}
# The plaintext sums, element by element: 1.5 + 2.5 + 3.5, 0 - 2.25 - 4.5, 0 + 10 + 20.
PLAIN = {"total": [7.5, -6.75, 30.0], "count": 9, "who": ["a", "b", "c"]}


def _module(tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "tanalysis.py").write_text(ANALYSIS)
    sys.path.insert(0, str(tmp_path))
    try:
        import tanalysis  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
    return tanalysis


def test_threshold_in_python_equals_the_plaintext_run(tmp_path: Path, caplog) -> None:
    module = _module(tmp_path)
    caplog.set_level(logging.INFO)
    secured = flame.simulate(module.analyze, module.aggregate, data=DATA, secure="threshold:2")
    assert np.allclose(secured.value["total"], PLAIN["total"], atol=1e-3, rtol=0)
    assert secured.value["count"] == PLAIN["count"] and secured.value["who"] == PLAIN["who"]
    assert "throwaway 2048-bit threshold key, 3 shares, any 2 decrypt" in caplog.text
    assert "decrypted with the partial decryptions of" in caplog.text


def test_the_secure_argument_is_checked() -> None:
    assert parse_secure("threshold") == SecureMode(threshold=True, t=None)
    assert parse_secure("threshold:3") == SecureMode(threshold=True, t=3)
    assert parse_secure(True) == SecureMode() and parse_secure(False) is None
    for wrong in ("thresh", "threshold:", "threshold:x", 3):
        with pytest.raises(ConfigError, match="expected True, 'threshold' or 'threshold:T'"):
            parse_secure(wrong)
    with pytest.raises(ConfigError, match="T must be between 1 and the 3 nodes"):
        flame.simulate(lambda d: 1, lambda r: 1, data=DATA, secure="threshold:4")


def _cli(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    data = tmp_path / "data"
    for node, files in DATA.items():
        (data / node).mkdir(parents=True, exist_ok=True)
        (data / node / "x.txt").write_text(files["x.txt"])
    (tmp_path / "analysis.py").write_text(ANALYSIS)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("FLAME_")}
    return subprocess.run(
        [sys.executable, "-m", "flame", "simulate", str(tmp_path / "analysis.py"),
         "--data", str(data), "--quiet", *extra],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def test_flame_simulate_secure_threshold_is_one_flag(tmp_path: Path) -> None:
    single = _cli(tmp_path, "--secure")  # one throwaway key pair
    secured = _cli(tmp_path, "--secure", "threshold")  # T: a majority, 2 of 3
    assert single.returncode == 0, single.stderr
    assert secured.returncode == 0, secured.stderr
    assert json.loads(secured.stdout) == json.loads(single.stdout) == PLAIN
    wrong = _cli(tmp_path, "--secure", "threshold:5")
    assert wrong.returncode == 2 and "T must be between 1 and the 3 nodes" in wrong.stderr
    typo = _cli(tmp_path, "--secure", "treshold")
    assert typo.returncode == 2 and "expected threshold or threshold:T" in typo.stderr
    assert "Traceback" not in wrong.stderr + typo.stderr

"""`flame simulate --broker embedded` over both brokers flame can start: the same answer as
the in-memory simulation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flame.transport import embedded

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "federated_logistic_regression"


def simulate(*extra: str) -> dict[str, object]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flame",
            "simulate",
            str(EXAMPLE),
            "--data",
            str(EXAMPLE / "data"),
            "--epochs",
            "20",
            "--quiet",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_embedded_mosquitto_gives_the_in_memory_answer() -> None:
    if embedded.shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("no mosquitto binary on this machine")
    assert simulate("--broker", "embedded") == simulate()


def test_embedded_amqtt_gives_the_in_memory_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("amqtt")
    broker = embedded.EmbeddedBroker()
    monkeypatch.setattr(embedded.shutil, "which", lambda name: None)
    monkeypatch.setattr(embedded.Path, "exists", lambda self: False)
    with broker as url:
        assert url.endswith("?protocol=3.1.1")
        monkeypatch.undo()
        assert simulate("--broker", url) == simulate()

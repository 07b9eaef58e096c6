"""The analysis child's stdout/stderr reach the node's log only as marked, capped lines."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from flame.isolation import output

PRINTER = r"""
import sys
print("plain line")
print("\x1b[2J\rFAKE node line")
print("x" * 5000 + "TAIL-OF-LONG-LINE")
for i in range(30):
    print(f"many {i}")
print("on stderr", file=sys.stderr)
"""


def test_the_childs_output_is_relayed_escaped_capped_and_bounded(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(output, "MAX_LINES", 10)
    process = subprocess.Popen(
        [sys.executable, "-c", PRINTER], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    with caplog.at_level(logging.INFO, logger="flame.analysis"):
        threads = output.relay_output(process, "node-a")
        process.wait(timeout=30)
        for thread in threads:
            thread.join(timeout=30)
    lines = [(r.levelno, r.getMessage(), getattr(r, "node_id", "")) for r in caplog.records]
    messages = [m for _, m, _ in lines]
    assert (logging.INFO, "analysis output: plain line", "node-a") in lines
    assert (logging.WARNING, "analysis stderr: on stderr", "node-a") in lines
    assert all("\x1b" not in m and "\r" not in m for m in messages)
    assert "analysis output: \\x1b[2J\\rFAKE node line" in messages
    assert not any("TAIL-OF-LONG-LINE" in m for m in messages)  # capped at MAX_LINE
    assert all(len(m) <= output.MAX_LINE + 20 for m in messages)
    relayed = [m for m in messages if m.startswith("analysis output:") and "dropped" not in m]
    assert len(relayed) == 10
    assert any("further line(s) dropped" in m for m in messages)

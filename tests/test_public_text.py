"""Text every roster member may read (statuses) or a terminal shows (forwarded log lines):
no analysis exception message (red team B2), no control sequence (red team B8)."""

from __future__ import annotations

import logging

from flame.node.log_forward import LogForwarder
from flame.utils.printable import escape_controls
from flame.utils.public_reason import public_reason


def test_public_reason_keeps_who_epoch_and_type_only() -> None:
    full = "node 'node-1' failed in epoch 0: ValueError: odd row: patient 4711"
    assert public_reason(full) == "node 'node-1' failed in epoch 0: ValueError (details: the logs)"
    assert "4711" not in public_reason("aggregator failed: KeyError: 'patient 4711'")
    assert "4711" not in public_reason("ValueError: odd row: patient 4711")
    assert public_reason(public_reason(full)) == public_reason(full)  # a node repeats it
    for flame_text in ("node 'aggregator' stopped: SIGTERM", "stopped: SIGINT",
                       "epoch 3: no result from node-2 within 20 s"):  # fmt: skip
        assert public_reason(flame_text) == flame_text


def test_control_sequences_are_escaped_tabs_kept() -> None:
    assert escape_controls("ok\x1b[1A\x1b[2Kx\ty\x9b\u2028") == "ok\\x1b[1A\\x1b[2Kx\ty\\x9b\\u2028"
    forwarder = LogForwarder()
    forwarder.emit(logging.LogRecord("analysis", logging.WARNING, "a.py", 1, "a\x1b[2Kb", (), None))
    assert forwarder.take() == ["WARNING analysis: a\\x1b[2Kb"]

"""Container-friendly logs: JSON lines with analysis, node and epoch; secrets never shown."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from flame.utils import logs as _logging

SECRET = "s3cr3t-Token-Value-123"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJub2RlIn0.c2lnbmF0dXJlLWJ5dGVz"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    flame_logger = logging.getLogger("flame")
    level, propagate = flame_logger.level, flame_logger.propagate
    yield
    if _logging._installed is not None:
        root.removeHandler(_logging._installed)
        _logging._installed = None
    flame_logger.setLevel(level)
    flame_logger.propagate = propagate
    _logging.set_epoch(None)
    _logging.set_node(None)


def _json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_analysis_node_and_epoch() -> None:
    stream = io.StringIO()
    _logging.configure(fmt="json", analysis_id="study-7", node_id="clinic_a", stream=stream)
    log = logging.getLogger("flame.federated.test")
    log.info("waiting for the aggregator")
    _logging.set_epoch(3)
    log.warning("epoch %d: %s", 3, "sent")
    _logging.set_epoch(None)
    log.info("done")

    lines = _json_lines(stream)
    assert [line["message"] for line in lines] == [
        "waiting for the aggregator",
        "epoch 3: sent",
        "done",
    ]
    for line in lines:
        assert line["analysis_id"] == "study-7"
        assert line["node_id"] == "clinic_a"
        assert set(line) >= {"time", "level", "logger", "message", "epoch"}
        assert str(line["time"]).endswith("Z")
    assert [line["epoch"] for line in lines] == [None, 3, None]
    assert lines[1]["level"] == "WARNING"
    assert lines[1]["logger"] == "flame.federated.test"


def test_secrets_are_masked_in_messages_arguments_and_tracebacks() -> None:
    stream = io.StringIO()
    _logging.configure(fmt="json", secrets=[SECRET], analysis_id="a", node_id="n", stream=stream)
    log = logging.getLogger("flame.clients.test")
    log.info("connecting with token %s", SECRET)
    log.info("header Authorization: Bearer %s", "opaque-bearer-value-99")
    log.info("url mqtt://flame:%s@broker:1883 and %s", "hunter22pw", JWT)
    log.info('query password=abc123def&x=1 and {"secret_key": "zzzz-9999"}')
    try:
        raise ValueError(f"server said no to {SECRET}")
    except ValueError:
        log.exception("request failed")

    text = stream.getvalue()
    for leaked in (SECRET, "opaque-bearer-value-99", "hunter22pw", JWT, "abc123def", "zzzz-9999"):
        assert leaked not in text, leaked
    lines = _json_lines(stream)
    assert lines[0]["message"] == "connecting with token ***"
    assert lines[1]["message"] == "header Authorization: Bearer ***"
    assert lines[2]["message"] == "url mqtt://flame:***@broker:1883 and ***"
    assert "ValueError: server said no to ***" in str(lines[4]["exception"])


def test_text_on_a_terminal_is_short_and_readable() -> None:
    stream = _Tty()
    _logging.configure(fmt="text", analysis_id="study", node_id="aggregator", stream=stream)
    _logging.set_epoch(0)
    logging.getLogger("flame.x").info("epoch finished in %.1f s", 1.25)
    line = stream.getvalue().strip()
    # "12:00:01 INFO    [study/aggregator e0] epoch finished in 1.2 s"
    assert line.endswith("INFO    [study/aggregator e0] epoch finished in 1.2 s"), line
    assert len(line.split()[0]) == 8  # HH:MM:SS


def test_text_off_a_terminal_has_the_full_utc_time() -> None:
    stream = io.StringIO()
    _logging.configure(fmt="text", node_id="n1", stream=stream)
    logging.getLogger("flame.x").warning("slow")
    line = stream.getvalue().strip()
    assert line.split()[0].endswith("Z")
    assert line.endswith("WARNING [n1] slow")


def test_library_warnings_go_through_the_same_redaction() -> None:
    stream = io.StringIO()
    _logging.configure(fmt="json", secrets=[SECRET], node_id="n", stream=stream)
    logging.getLogger("urllib3.connectionpool").warning("Retrying (%s) %s", 1, SECRET)
    logging.getLogger("urllib3.connectionpool").info("not shown: below the root's level")
    lines = _json_lines(stream)
    assert len(lines) == 1
    assert lines[0]["message"] == "Retrying (1) ***"
    assert lines[0]["node_id"] == "n"


def test_configure_twice_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    _logging.configure(fmt="json", stream=first)
    _logging.configure(fmt="json", stream=second)
    logging.getLogger("flame.x").info("once")
    assert first.getvalue() == ""
    assert len(_json_lines(second)) == 1


def test_each_simulated_node_thread_keeps_its_own_node_and_epoch() -> None:
    stream = io.StringIO()
    _logging.configure(fmt="json", analysis_id="sim", stream=stream)
    barrier = threading.Barrier(2)

    def node(name: str, epoch: int) -> None:
        _logging.set_node(name)
        _logging.set_epoch(epoch)
        barrier.wait(timeout=5)
        logging.getLogger("flame.node").info("hello from %s", name)

    threads = [threading.Thread(target=node, args=(f"node_{i}", i)) for i in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    seen = {(line["node_id"], line["epoch"]) for line in _json_lines(stream)}
    assert seen == {("node_1", 1), ("node_2", 2)}


def test_flame_run_logs_json_lines_when_asked() -> None:
    """FLAME_LOG_FORMAT=json reaches the CLI: a config error still prints the CLI's line, and
    any log line it emits is JSON (the run itself is exercised in test_container)."""
    env = {"FLAME_LOG_FORMAT": "json", "FLAME_LOG_LEVEL": "DEBUG", "PATH": "/usr/bin:/bin"}
    code = (
        "import logging, sys\n"
        "from flame.utils import logs as _logging\n"
        "from flame.config import load_config\n"
        "c = load_config()\n"
        "_logging.configure(level=c.log_level, fmt=c.log_format, secrets=c.secrets(),\n"
        "    analysis_id=c.analysis_id, node_id='n')\n"
        "logging.getLogger('flame.t').debug('token is %s', 'tok-value-1234')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "FLAME_BROKER__TOKEN": "tok-value-1234"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stderr.strip().splitlines()[-1])
    assert line["message"] == "token is ***"
    assert line["analysis_id"] == "local"

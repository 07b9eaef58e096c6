"""Issue 20: what flame's readers quote from the node's data is marked, and withheld from
error reports unless the node's policy sets send_tracebacks = true itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from flame.data import Data, LocalSource
from flame.errors import DataError
from flame.privacy.policy import NodePolicy
from flame.privacy.quoting import (
    WITHHELD,
    quote_parser_message,
    quoted_may_leave,
    withhold_quoted,
)


@pytest.mark.parametrize(
    ("message", "kept"),
    [
        ("CSV parse error: Expected 1 columns, got 3: 62;26,402;patient0", "got 3"),
        ("Conversion Error: Could not convert string 'patient0' to INT32", "to INT32"),
        ('invalid input syntax for type integer: "patient0"', "invalid input syntax"),
        ("some message naming patient0 without quotes", ""),
        ("Conversion Error: Could not convert string 'O'patient0' to INT32", "to INT32"),
        ("Could not convert string 'patient0 to INT32", ""),
        ("Could not convert 'a' and \"b'patient0\" here", "here"),
    ],
)
def test_quoted_data_is_withheld_and_the_rest_kept(message: str, kept: str) -> None:
    text = withhold_quoted(f"DataError: 'x.csv' cannot be read: {quote_parser_message(message)}")
    assert "patient0" not in text and WITHHELD in text
    assert kept in text


def test_a_fragment_cut_off_at_the_end_is_withheld_too() -> None:
    text = quote_parser_message("CSV parse error: Expected 1 columns, got 3: 62;26,402;pat")
    assert "62;26" not in withhold_quoted(text[:-1])  # closing mark cut off (length cap)


def test_the_reader_marks_the_row_it_quotes(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("age;bmi\n62;26,402;patient0\n")
    with pytest.raises(DataError) as failed:
        Data({"local": LocalSource(tmp_path)}).read_csv("x.csv")
    # the reader names file and line and never quotes the row (issue 22); had it quoted one,
    # the quote would be withheld before leaving the node
    assert "'x.csv'" in str(failed.value) and "line 2" in str(failed.value)
    assert "patient0" not in str(failed.value)
    assert "patient0" not in withhold_quoted(str(failed.value))


def test_only_an_explicit_send_tracebacks_lets_quoted_data_leave() -> None:
    assert not quoted_may_leave(NodePolicy())  # the default lets tracebacks out, not records
    assert not quoted_may_leave(NodePolicy(send_tracebacks=False))
    assert quoted_may_leave(NodePolicy(send_tracebacks=True))


def test_forwarded_log_lines_never_carry_quoted_data() -> None:
    import logging

    from flame.node.log_forward import LogForwarder

    forwarder = LogForwarder()
    text = quote_parser_message("CSV parse error: Expected 1 columns, got 3: 62;26,patient0")
    record = logging.LogRecord(
        "flame.node", logging.ERROR, __file__, 1, "failed: %s", (text,), None
    )
    forwarder.emit(record)
    lines = "\n".join(forwarder.take())
    assert "got 3" in lines and "patient0" not in lines


def test_a_frame_with_too_many_json_values_is_refused_before_parsing() -> None:
    from flame.errors import MessageError
    from flame.wire.envelope import Envelope, decode, encode

    frame = encode(Envelope("a", "n", "n", "message", 0, {"x": [{}] * 1000}, "result"))
    assert decode(frame, max_items=5000).body == {"x": [{}] * 1000}
    with pytest.raises(MessageError, match="numpy arrays"):
        decode(frame, max_items=1000)

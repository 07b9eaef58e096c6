"""A masking request that makes the node's masking code raise something no check foresaw
is refused with an error reply naming only the exception's type; the node's runtime goes
on (a malformed message never crashes a running node)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from flame.node.secure_answers import SecureAnswers
from flame.secure.masking import MASK, MASKED
from flame.wire.envelope import Envelope


class _Transport:
    def __init__(self) -> None:
        self.sent: list[Envelope] = []

    def send(self, envelope: Envelope) -> None:
        self.sent.append(envelope)


class _Broken:
    def answer(self, envelope: Envelope) -> dict[str, Any]:
        raise RecursionError("secret-value-42 nested too deep")


def test_an_unexpected_error_in_a_masking_round_is_an_error_reply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = _Transport()
    answers = SecureAnswers(None, transport, lambda: None, masking=_Broken())  # type: ignore[arg-type]
    request = Envelope("ana", "agg", "n1", "message", 3, {"round": "keys"}, MASK)
    with caplog.at_level(logging.ERROR):
        answers.answer(request)  # must not raise
    (reply,) = transport.sent
    assert reply.category == MASKED and reply.recipient == "agg" and reply.epoch == 3
    assert reply.body == {"error": "the node could not handle the request (RecursionError)"}
    assert "RecursionError" in caplog.text and "secret-value-42" not in caplog.text

"""StatusBoard (routine statuses coalesced, final ones at once and in order) and Delivery
(broker acceptance confirmed later), with a recording transport and fake acknowledgements."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from flame.errors import TransportError
from flame.node.status_board import StatusBoard
from flame.transport.base import Delivery


class Recorder:
    """The part of a Transport a StatusBoard uses: `announce`, recorded with its time."""

    node_id = "n1"

    def __init__(self, fail: bool = False) -> None:
        self.published: list[tuple[float, dict[str, Any]]] = []
        self.fail = fail
        self.published_event = threading.Event()

    def announce(self, status: dict[str, Any]) -> None:
        if self.fail:
            raise TransportError("cannot announce: n1 is not connected")
        self.published.append((time.monotonic(), dict(status)))
        self.published_event.set()

    def states(self) -> list[Any]:
        return [(s["state"], s.get("epoch")) for _, s in self.published]


def board(recorder: Recorder, interval: float = 0.2) -> StatusBoard:
    return StatusBoard(recorder, interval)  # type: ignore[arg-type]


def test_a_burst_of_routine_statuses_becomes_the_first_and_the_latest() -> None:
    recorder = Recorder()
    statuses = board(recorder)
    for epoch in range(20):
        statuses.soon({"state": "computing", "epoch": epoch})
        statuses.soon({"state": "sent", "epoch": epoch})
    assert recorder.states() == [("computing", 0)]  # at once: nothing was published lately
    deadline = time.monotonic() + 5
    while len(recorder.published) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # and nothing after it
    assert recorder.states() == [("computing", 0), ("sent", 19)]
    first, second = recorder.published[0][0], recorder.published[1][0]
    assert second - first >= 0.19  # not before the interval is over


def test_a_final_status_goes_at_once_after_the_routine_one_still_waiting() -> None:
    recorder = Recorder()
    statuses = board(recorder, interval=5.0)
    statuses.soon({"state": "computing", "epoch": 0})
    statuses.soon({"state": "sent", "epoch": 0})  # waits (interval not over)
    statuses.now({"state": "done", "epoch": 0})
    assert recorder.states() == [("computing", 0), ("sent", 0), ("done", 0)]
    time.sleep(0.1)
    statuses.close()
    assert len(recorder.published) == 3  # the timer had nothing left to publish


def test_slow_epochs_show_every_status() -> None:
    recorder = Recorder()
    statuses = board(recorder, interval=0.05)
    for epoch in range(3):
        statuses.soon({"state": "computing", "epoch": epoch})
        time.sleep(0.08)
        statuses.soon({"state": "sent", "epoch": epoch})
        time.sleep(0.08)
    assert [s for s, _ in recorder.states()] == ["computing", "sent"] * 3


def test_close_drops_the_waiting_status_and_stops_the_timer() -> None:
    recorder = Recorder()
    statuses = board(recorder)
    statuses.soon({"state": "computing", "epoch": 0})
    statuses.soon({"state": "sent", "epoch": 0})
    statuses.close()
    time.sleep(0.35)
    assert recorder.states() == [("computing", 0)]
    statuses.soon({"state": "computing", "epoch": 1})  # after close: nothing
    assert recorder.states() == [("computing", 0)]


def test_a_failing_routine_publish_now_raises_and_one_from_the_timer_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder(fail=True)
    statuses = board(recorder, interval=0.05)
    with pytest.raises(TransportError):
        statuses.soon({"state": "computing", "epoch": 0})
    statuses._last = time.monotonic()  # as if one had gone out just now
    statuses.soon({"state": "sent", "epoch": 0})  # goes through the timer
    deadline = time.monotonic() + 5
    while "could not publish its status" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "could not publish its status" in caplog.text


# --- Delivery --------------------------------------------------------------------------------


class FakePublish:
    """A publish the test acknowledges (or refuses) by hand."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.refusal: str | None = None
        self.abandoned = False

    @property
    def acknowledged(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float) -> None:
        if not self.event.wait(timeout):
            raise TransportError(f"broker did not acknowledge within {timeout:g} s")
        if self.refusal:
            raise TransportError(f"broker refused the message: {self.refusal}")

    def abandon(self) -> None:
        self.abandoned = True


def test_delivery_says_when_every_message_is_accepted() -> None:
    first, second = FakePublish(), FakePublish()
    delivery = Delivery([("a", first), ("b", second)], 5.0)
    assert not delivery.check()
    first.event.set()
    assert not delivery.check()
    second.event.set()
    assert delivery.check()
    delivery.wait()  # nothing left: returns at once


def test_delivery_names_the_recipient_the_broker_refused() -> None:
    accepted, refused = FakePublish(), FakePublish()
    delivery = Delivery([("a", accepted), ("b", refused)], 5.0)
    accepted.event.set()
    refused.refusal = "not authorized"
    refused.event.set()
    with pytest.raises(TransportError, match=r"cannot send to 'b'.*not authorized"):
        delivery.check()


def test_delivery_past_its_deadline_is_an_error_and_joined_ones_keep_the_earlier_deadline() -> None:
    slow = FakePublish()
    delivery = Delivery([("a", slow)], 0.05) + Delivery([("b", FakePublish())], 60.0)
    assert not delivery.check()
    time.sleep(0.08)
    with pytest.raises(TransportError, match="cannot send to 'a'"):
        delivery.check()
    assert slow.abandoned

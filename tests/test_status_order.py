"""Which retained statuses count as current (flame.transport.status_order), without a broker."""

from __future__ import annotations

import itertools
from typing import Any

from flame.transport.status_order import CLOCK_SKEW, StatusOrder

STARTED = 1_000_000.0  # when the receiver started


class Process:
    """Statuses as one process of a node signs them: instance, start, growing seq, time."""

    _ids = itertools.count()

    def __init__(self, since: float) -> None:
        self.instance = f"p{next(self._ids)}"
        self.since = since
        self.seq = itertools.count(1)

    def status(self, state: str, at: float, **extra: Any) -> dict[str, Any]:
        return {
            "state": state,
            "instance": self.instance,
            "since": self.since,
            "seq": next(self.seq),
            "at": at,
            **extra,
        }


def test_the_current_process_is_taken_in_order_and_a_replay_of_it_is_stale() -> None:
    order = StatusOrder(STARTED)
    node = Process(STARTED - 100)
    will = node.status("offline", STARTED - 100)  # signed at connect
    waiting, computing = node.status("waiting", STARTED - 99), node.status("computing", STARTED + 1)
    assert order.check("n", waiting) is None
    assert order.check("n", computing) is None
    assert order.check("n", computing) is None  # the same status republished after a reconnect
    assert "behind" in str(order.check("n", waiting))  # replayed: older seq
    assert order.check("n", will) is None  # the last will, signed before what followed


def test_an_earlier_run_cannot_fake_a_second_process() -> None:
    order = StatusOrder(STARTED)
    old = Process(STARTED - 3600)  # an earlier run of the same analysis id
    recorded = [old.status("computing", STARTED - 3590 + i) for i in range(3)]
    new = Process(STARTED - 10)
    assert order.check("n", new.status("waiting", STARTED - 5)) is None
    for status in recorded:  # every one of them: stale
        assert "earlier process" in str(order.check("n", status))
    goodbye = old.status("done", STARTED - 3000, online=False)
    assert "goodbye" in str(order.check("n", goodbye))
    conflict = old.status("failed", STARTED - 3000, conflict=old.instance)
    assert "conflict report" in str(order.check("n", conflict))


def test_a_replay_first_then_the_live_process_takes_over() -> None:
    """The attacker made a recorded status the retained one before this receiver started."""
    order = StatusOrder(STARTED)
    old, new = Process(STARTED - 3600), Process(STARTED - 10)
    first, later = old.status("computing", STARTED - 3590), old.status("sent", STARTED - 3580)
    assert order.check("n", first) is None  # nothing to compare with yet
    assert order.check("n", new.status("computing", STARTED + 2)) is None  # a later process
    assert order.check("n", first) is not None
    assert order.check("n", later) is not None, "a newer seq of the earlier run is still old"


def test_a_live_second_process_still_shows() -> None:
    """A real split brain: an earlier process that signs new statuses now, or reports one."""
    order = StatusOrder(STARTED)
    older, newer = Process(STARTED - 50), Process(STARTED - 20)
    assert order.check("n", older.status("waiting", STARTED - 40)) is None
    assert order.check("n", newer.status("waiting", STARTED + 1)) is None
    assert order.check("n", older.status("computing", STARTED + 2)) is None  # alive: passed on
    other = Process(STARTED - 30)  # never seen before; reports the conflict it lost
    report = other.status("failed", STARTED + 3, conflict=other.instance)
    assert order.check("n", report) is None
    assert order.check("n", other.status("waiting", STARTED - CLOCK_SKEW - 1)) is not None


def test_a_restart_with_its_clock_stepped_back_is_a_restart() -> None:
    """The generation, not the clock, orders a node's processes: a process started 10 min
    "before" its predecessor (its clock stepped back) with the next generation is current."""
    order = StatusOrder(STARTED)
    old = Process(STARTED - 100)
    seen = old.status("computing", STARTED + 1, gen=1)
    assert order.check("n", seen) is None
    new = Process(STARTED - 700)
    assert order.check("n", new.status("waiting", STARTED - 690, gen=2)) is None
    assert order.check("n", new.status("computing", STARTED - 689, gen=2)) is None
    # Replays are still refused: the predecessor's statuses, seen or signed before we started,
    # and an older generation whatever its clock says.
    assert "nothing new" in str(order.check("n", seen))
    assert "before this process started" in str(
        order.check("n", old.status("sent", STARTED - 90, gen=1))
    )
    older = Process(STARTED + 500)  # a later clock, but an earlier generation
    assert "earlier process" in str(order.check("n", older.status("waiting", STARTED - 1, gen=0)))
    assert order.check("n", new.status("sent", STARTED - 688, gen=2)) is None  # still current


def test_a_generation_that_is_not_a_count_is_not_bound() -> None:
    order = StatusOrder(STARTED)
    for gen in (-1, 1.5, "2", True):
        status = Process(STARTED).status("waiting", STARTED, gen=gen)
        assert "not bound" in str(order.check("n", status))


def test_unbound_statuses() -> None:
    order = StatusOrder(STARTED)
    assert "not bound" in str(order.check("n", {"state": "waiting", "instance": "x"}))
    assert order.check("n", {"state": "waiting"}, signed=False) is None


def test_flame_status_marks_statuses_of_another_run_not_current() -> None:
    from flame.ops.status import NodeStatus, RunStatus, _mark_current

    old, agg, node = Process(STARTED - 3600), Process(STARTED), Process(STARTED + 1)
    payloads = {
        "aggregator": {**old.status("done", STARTED - 3500), "role": "aggregation", "run": "r1"},
        "node-0": {**node.status("computing", STARTED + 5), "role": "analysis", "run": "r2"},
        "node-1": {**agg.status("waiting", STARTED + 2), "role": "analysis", "run": None},
    }
    found = {n: NodeStatus.from_payload(n, p) for n, p in payloads.items()}
    marked = _mark_current({n: s for n, s in found.items() if s is not None})
    assert marked["aggregator"].current is False and "r1" in str(marked["aggregator"].stale)
    assert marked["node-0"].current is True and marked["node-1"].current is True
    run = RunStatus("a", nodes=marked, aggregator_id="aggregator")
    assert run.state == "running", "an earlier run's 'done' does not finish this one"
    assert "NOT CURRENT" in marked["aggregator"].describe()


def test_after_its_last_will_only_a_newly_signed_status_brings_a_process_back() -> None:
    """A replay of a dead process's last genuine status (same seq) after its will is stale;
    the live process, reconnecting, re-signs with the next seq and is taken (red-team 1)."""
    order = StatusOrder(STARTED)
    node = Process(STARTED - 100)
    will = node.status("offline", STARTED - 100)
    computing = node.status("computing", STARTED + 1)
    assert order.check("n", computing) is None
    assert order.check("n", will) is None  # it died: the broker fired its will
    assert "replay" in str(order.check("n", computing))  # the operator re-publishes it
    renewed = node.status("computing", STARTED + 30)  # the same process, reconnected
    assert order.check("n", renewed) is None
    assert order.check("n", renewed) is None  # republished unchanged: fine while it lives

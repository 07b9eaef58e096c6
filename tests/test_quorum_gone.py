"""Under a quorum, nodes known gone hold no epoch (flame.aggregator.presence): a failed node is a
missing answer recorded with its reason; too many gone fails the run at once, naming them."""

from __future__ import annotations

from typing import Any

import pytest
from test_protocol import VALUES, config, data_spec, pooled_sum, sum_aggregate, sum_analyze

import flame
from flame.data import Data
from flame.errors import RunFailed


def failing_on(*nodes: str) -> Any:
    def analyze(data: Data, epoch: int, previous: Any) -> dict[str, Any]:
        if flame.context().node_id in nodes:
            raise ValueError("this site cannot compute it")
        return sum_analyze(data, epoch, previous)

    return analyze


@pytest.mark.timeout(60)  # far below the 120 s epoch deadline: no epoch waits it out
def test_a_failed_node_under_quorum_is_a_missing_answer_with_its_reason() -> None:
    result = flame.simulate(
        failing_on("gamma"),
        sum_aggregate,
        data=data_spec(),
        config=config(epoch_timeout=120.0, quorum=2, epochs=2),
    )
    for record in result.history:
        assert record.missing == ["gamma"]
        assert "this site cannot compute it" in record.absent["gamma"]
        again = type(record).from_dict(record.to_dict())
        assert again.absent == record.absent  # kept in checkpoints and the manifest
    without = {n: v for n, v in VALUES.items() if n != "gamma"}
    assert result.value["sum"] == pytest.approx(pooled_sum(without))


@pytest.mark.timeout(60)
def test_too_many_gone_for_the_quorum_fails_at_once_naming_them() -> None:
    with pytest.raises(RunFailed) as caught:
        flame.simulate(
            failing_on("beta", "gamma"),
            sum_aggregate,
            data=data_spec(),
            config=config(epoch_timeout=120.0, quorum=2),
        )
    message = str(caught.value)
    assert "below the quorum of 2" in message
    assert "beta (" in message and "gamma (" in message


def test_a_replayed_status_of_a_node_gone_by_its_will_does_not_bring_it_back() -> None:
    """Gone.back applies the rule of status_order too: after a last will only a status of
    the same process with a higher seq (or of a new process) is a return (red-team 1)."""
    from flame.aggregator.membership import Gone

    gone = Gone(["a", "b", "c"], quorum=2)
    last = {"state": "computing", "instance": "i1", "seq": 7, "session": "i1"}
    gone.back("c", "i1", last)
    assert gone.note("c", "offline: its connection ended")
    gone.back("c", "i1", last)  # replayed
    assert "c" in gone
    gone.back("c", "i1", {**last, "seq": 8})  # re-signed on reconnect: really back
    assert "c" not in gone
    gone.back("c", "i1", {**last, "seq": 9})
    assert gone.note("c", "offline: its connection ended")
    gone.back("c", "i2", {**last, "instance": "i2", "seq": 1})  # a restart
    assert "c" not in gone


def test_a_missing_node_whose_statuses_were_ignored_as_stale_is_named_so() -> None:
    """The presence error says when a 'missing' node's statuses were dropped as stale, so the
    operator does not look for a node that is down when it is live (red-team 4)."""
    from flame.aggregator.membership import missing_text

    text = missing_text(["node-2", "node-3"], {"node-2": 3})
    assert text.startswith("node-2 (3 status(es) of it ignored as stale")
    assert text.endswith(", node-3")

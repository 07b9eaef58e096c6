"""Per-epoch metrics: traffic in the history and in each node's 'sent' status."""

from __future__ import annotations

import numpy as np

import flame
from flame.testing import MemoryBroker

NODES = {"a": {"x.csv": "v\n1\n2\n"}, "b": {"x.csv": "v\n3\n"}}


def analyze(data, epoch, previous):
    return {"payload": np.zeros(1000 * (epoch + 1))}  # grows each epoch


def aggregate(results, epoch, previous):
    return {"size": sum(r["payload"].size for r in results.values())}


def test_history_counts_the_bytes_of_each_epoch() -> None:
    broker = MemoryBroker()
    result = flame.simulate(analyze, aggregate, data=NODES, epochs=3, broker=broker)
    received = [record.bytes_received for record in result.history]
    # two nodes send 8,000 / 16,000 / 24,000 bytes of float64 per epoch, plus headers
    for epoch, count in enumerate(received):
        assert 2 * 8000 * (epoch + 1) < count < 2 * 8000 * (epoch + 1) + 20_000
    assert all(record.bytes_sent > 0 for record in result.history[:-1])
    assert result.history[-1].to_dict()["bytes_received"] == received[-1]


def test_sent_status_reports_duration_and_traffic() -> None:
    broker = MemoryBroker()
    flame.simulate(analyze, aggregate, data=NODES, epochs=1, broker=broker)
    statuses = []
    original = broker.set_status

    def spy(analysis_id, node_id, status):
        statuses.append((node_id, dict(status)))
        original(analysis_id, node_id, status)

    broker.set_status = spy  # type: ignore[method-assign]
    flame.simulate(analyze, aggregate, data=NODES, epochs=1, broker=broker)
    sent = [s for node, s in statuses if s.get("state") == "sent"]
    assert {node for node, s in statuses if s.get("state") == "sent"} == {"a", "b"}
    for status in sent:
        assert status["bytes_sent"] > 8000
        assert status["duration_s"] >= 0

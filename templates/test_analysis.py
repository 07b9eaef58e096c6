"""Test your analysis like any code: `pytest test_analysis.py` (needs `pip install flame`).

flame.testing runs the whole federation in memory, through the same message encoding as
production, with each simulated node's files given inline.
"""

import pytest
from aggregator_generic import aggregate, converged
from analyzer_generic import analyze

from flame.testing import run_federation


def test_mean_over_nodes_equals_the_pooled_mean():
    nodes = {
        "hospital_a": {"data.csv": "value\n1\n2\n3\n"},
        "hospital_b": {"data.csv": "value\n10\n"},
    }
    result = run_federation(analyze, aggregate, converged, data=nodes)
    assert result.value["count"] == 4
    assert result.value["mean"] == pytest.approx((1 + 2 + 3 + 10) / 4)
    assert result.history[0].nodes == ["hospital_a", "hospital_b"]


def test_every_message_delivered_twice_changes_nothing():
    nodes = {"a": {"d.csv": "value\n1\n"}, "b": {"d.csv": "value\n3\n"}}
    result = run_federation(analyze, aggregate, data=nodes, duplicate_every=1)
    assert result.value["mean"] == pytest.approx(2.0)

"""The DP release as the runtime uses a marker: converted first, then copied from exact
built-ins and checked (node gate and aggregator alike); markers never print their values;
a ledger holding a NaN or negative spend refuses; wire errors never quote a key or a cell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import flame
from flame.dp import Noise, gaussian_sigma
from flame.errors import FlameError, PolicyRefused, RunFailed
from flame.isolation.runner import Outcome
from flame.privacy.central import AggregatorPolicy, CentralDP
from flame.privacy.ledger import BudgetLedger, Spend
from flame.privacy.release import Gate
from flame.wire.envelope import Envelope, encode

EXACT = 4242.424242


class Rewrites:
    """Values whose conversion to numbers rewrites the (frozen) marker holding them."""

    def __init__(self, field: str, new: Any, size: int) -> None:
        self.field, self.new, self.size = field, new, size
        self.marker: Noise | None = None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        assert self.marker is not None
        object.__setattr__(self.marker, self.field, self.new)
        return np.zeros(self.size, dtype=np.float64)


class Shown:
    """A cell Arrow cannot convert whose repr is the value (pyarrow quotes it)."""

    def __repr__(self) -> str:
        return repr(EXACT)


def gate(tmp_path: Path, **rules: Any) -> Gate:
    policy = flame.NodePolicy(
        epsilon_budget=5.0, delta_budget=1e-4, ledger_dir=tmp_path, trust_sensitivity=True,
        **rules,
    )  # fmt: skip
    return Gate(policy, node_id="a", analysis_id="x")


@pytest.mark.parametrize(
    "field, new", [("contributors", 10**12), ("epsilon", -5.0)], ids=["contributors", "refund"]
)
def test_the_node_gate_checks_the_marker_after_converting_its_values(
    tmp_path: Path, field: str, new: Any
) -> None:
    """In process (flame.simulate) __array__ runs in the gate: the marker is read after its
    values are converted, so a rewrite is checked (and refused), never charged or drawn."""
    lazy = Rewrites(field, new, 4000)
    marker = flame.dp.gaussian(lazy, 1.0, 0.5, 1e-6)
    lazy.marker = marker
    with pytest.raises(PolicyRefused):
        gate(tmp_path).release(0, Outcome({"t": marker}, 100))
    assert BudgetLedger(tmp_path, "a", "default", 5.0, 1e-4).spent() == Spend()


def test_the_gate_noises_with_the_parameters_it_charges(tmp_path: Path) -> None:
    released = gate(tmp_path).release(
        0, Outcome({"t": flame.dp.gaussian(np.zeros(4000), 1.0, 0.5, 1e-6)}, 100)
    )
    assert float(np.std(released.result["t"])) > gaussian_sigma(1.0, 0.5, 1e-6) / 2
    assert released.spend == Spend(0.5, 1e-6)


def test_a_dict_subclass_does_not_hide_a_marker_from_the_node_gate(tmp_path: Path) -> None:
    class Hiding(dict):  # type: ignore[type-arg]
        def items(self) -> Any:
            return iter(())

    released = gate(tmp_path).release(0, Outcome(Hiding(t=flame.dp.laplace(EXACT, 1.0, 1.0)), 9))
    assert type(released.result) is dict and isinstance(released.result["t"], float)
    assert released.result["t"] != EXACT and released.spend.epsilon == 1.0


def test_a_float_subclass_is_charged_as_the_float_it_converts_to(tmp_path: Path) -> None:
    class Liar(float):
        def __radd__(self, other: Any) -> Any:
            return float("nan")

    with pytest.raises(PolicyRefused, match="epsilon_budget"):
        gate(tmp_path).release(0, Outcome({"t": flame.dp.laplace(EXACT, 1.0, Liar(50.0))}, 9))
    assert BudgetLedger(tmp_path, "a", "default", 5.0, 1e-4).spent() == Spend()


def test_markers_do_not_print_their_values() -> None:
    assert "4242" not in repr(flame.dp.laplace(EXACT, 1.0, 1.0))
    assert "4242" not in str(flame.dp.gaussian([EXACT], 1.0, 1.0, 1e-6))
    assert "4242" not in repr(flame.counts(int(EXACT)))
    assert "4242" not in repr(flame.secure(EXACT)) and "4242" not in str(flame.secure([EXACT]))


@pytest.mark.parametrize("entry", [{"epsilon": float("nan")}, {"epsilon": -1.0}, {"delta": "0"}])
def test_a_ledger_with_an_untrustworthy_entry_refuses_and_names_its_file(
    tmp_path: Path, entry: dict[str, Any]
) -> None:
    ledger = BudgetLedger(tmp_path, "a", "s", 10.0, 0.1)
    recorded = {"analysis": "x", "epoch": 0, "epsilon": 0.1, "delta": 0.0, **entry}
    ledger.path.write_text(json.dumps({"entries": [recorded]}))
    with pytest.raises(PolicyRefused, match=r"a--s\.json.*repairs"):
        ledger.charge(Spend(0.1), analysis="y", epoch=1)
    with pytest.raises(PolicyRefused, match="repairs"):
        ledger.check(Spend(0.1), "x")


@pytest.mark.parametrize("spend", [Spend(float("nan")), Spend(-1.0), Spend(0.1, float("inf"))])
def test_a_ledger_records_no_nan_or_negative_spend(tmp_path: Path, spend: Spend) -> None:
    ledger = BudgetLedger(tmp_path, "a", "s", 10.0, 0.1)
    with pytest.raises(PolicyRefused, match="finite non-negative"):
        ledger.charge(spend, analysis="y", epoch=0)
    assert not ledger.path.exists()


def test_central_dp_refuses_a_marker_in_a_table_naming_what_to_return(tmp_path: Path) -> None:
    dp = CentralDP(
        AggregatorPolicy(epsilon_budget=5.0, ledger_dir=tmp_path), node_id="agg", analysis_id="x"
    )
    for value in (
        {"table": pd.DataFrame({"t": [flame.dp.laplace(EXACT, 1.0, 0.5)]})},
        {"s": {flame.dp.laplace(EXACT, 1.0, 0.5)}},
        {"k": {flame.dp.laplace(EXACT, 1.0, 0.5): 1}},
    ):
        with pytest.raises(RunFailed, match="plain dict/list") as refused:
            dp.release(value, 0)
        assert "4242" not in str(refused.value)
    assert not (tmp_path / "agg--aggregate.json").exists()


@pytest.mark.parametrize(
    "body",
    [
        {"t": pd.DataFrame({"c": [flame.dp.laplace(EXACT, 1.0, 0.5)]})},
        {"t": pd.DataFrame({"c": [Shown()]})},
        {"k": {(EXACT, 1): 1}},
        {"m": flame.dp.laplace(EXACT, 1.0, 0.5)},
    ],
    ids=["marker-cell", "object-cell", "tuple-key", "marker"],
)
def test_wire_errors_name_the_path_and_type_never_the_value(body: Any) -> None:
    with pytest.raises((TypeError, FlameError)) as refused:
        encode(Envelope("a", "b", "c", "result", 0, body))
    assert "4242" not in str(refused.value) and "body." in str(refused.value)

"""Central DP at the aggregator: noise added once to the aggregate, paid from its own budget.

For set-ups that trust the aggregator with the nodes' exact results (as the FLAME platform's
examples do). `aggregate` returns `flame.dp.laplace(total, sensitivity, epsilon)` or
`flame.dp.gaussian(...)` anywhere in its value (dicts, lists, tuples); the aggregator
runtime, never the aggregate code, checks every marker (a forged one is refused), charges
the epoch's whole spend to the aggregator's ledger (refused: nothing is drawn, the run
fails, the exact value goes nowhere), then draws each marker's noise once with OpenDP's
samplers (a CSPRNG, unseedable). Only the noisy value is used afterwards: sent to the nodes
as `previous`, checkpointed, given to `converged`, stored and returned. Every epoch whose
aggregate holds markers is a release and is charged (its value leaves the aggregator).

The budget is the aggregator operator's, in the aggregation node's policy file
(`FLAME_POLICY` there; `flame simulate --aggregator-policy`, `aggregator_policy=`). Without
one, a marker is refused: nobody has agreed to spend, and nothing would account for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flame.dp import Noise, Statistic, add_noise, noise_scale
from flame.errors import FlameError, PolicyRefused, RunFailed
from flame.privacy.ledger import BudgetLedger, Spend
from flame.privacy.policy import NodePolicy, read_policy

__all__ = ["AggregatorPolicy", "CentralDP", "load_aggregator_policy"]

log = logging.getLogger(__name__)

WHERE = "FLAME_POLICY on the aggregation node"  # where `flame run` reads the aggregator's budget


class AggregatorPolicy(BaseModel):
    """The aggregator operator's central-DP budget. The default spends nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon_budget: float | None = Field(
        None,
        ge=0,
        description="total epsilon the aggregates of this dataset may spend with central DP "
        "(None: flame.dp markers in an aggregate are refused)",
    )
    delta_budget: float = Field(0.0, ge=0, lt=1, description="total delta they may spend")
    budget_scope: str = Field(
        "aggregate",
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="the dataset (the federation's pooled data) the budget is of",
    )
    ledger_dir: Path | None = Field(
        None,
        description="where the aggregator's ledger lives (default: .flame-ledger beside "
        "the policy file)",
    )

    @model_validator(mode="after")
    def _budget(self) -> AggregatorPolicy:
        if self.delta_budget > 0 and self.epsilon_budget is None:
            raise ValueError("delta_budget: set epsilon_budget too (the ledger tracks both)")
        return self


# a node's rules in a policy file the aggregator shares with its nodes: not the aggregator's
NODE_RULES = frozenset(NodePolicy.model_fields) - frozenset(AggregatorPolicy.model_fields)


def load_aggregator_policy(
    spec: AggregatorPolicy | str | Path | None, *, base: Path | None = None
) -> AggregatorPolicy:
    """The aggregator's policy from a file (None: no central-DP budget)."""
    if spec is None:
        return AggregatorPolicy()
    if isinstance(spec, AggregatorPolicy):
        return spec
    return read_policy(
        Path(spec), AggregatorPolicy, base=base, ignore=NODE_RULES, what="aggregator policy"
    )


@dataclass
class _Marked:
    """One marker found in the aggregate: where, and its values as checked numbers."""

    path: str
    marker: Noise
    values: np.ndarray


@dataclass
class CentralRelease:
    """What central DP did to one epoch's aggregate (for the run's history and status)."""

    fields: list[str] = field(default_factory=list)
    spend: Spend = field(default_factory=Spend)
    total_spent: Spend | None = None

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = {"central": list(self.fields), "spend": self.spend.as_dict()}
        if self.total_spent is not None:
            report["spent_total"] = self.total_spent.as_dict()
        return report


class CentralDP:
    """The aggregator runtime's release of an aggregate holding flame.dp markers."""

    def __init__(
        self,
        policy: AggregatorPolicy | None,
        *,
        node_id: str,
        analysis_id: str,
        where: str = WHERE,
    ) -> None:
        self.policy = policy if policy is not None else AggregatorPolicy()
        self.node_id = node_id
        self.analysis_id = analysis_id
        self.where = where  # how the operator sets the budget, for error messages
        self.ledger: BudgetLedger | None = None
        if self.policy.epsilon_budget is not None:
            if self.policy.ledger_dir is None:
                raise FlameError("the aggregator policy has a budget but no ledger_dir")
            self.ledger = BudgetLedger(
                self.policy.ledger_dir,
                node_id,
                self.policy.budget_scope,
                self.policy.epsilon_budget,
                self.policy.delta_budget,
            )

    def release(self, value: Any, epoch: int) -> tuple[Any, CentralRelease | None]:
        """`value` with every marker's noise drawn, charged first; (value, None) unchanged
        when it holds none. RunFailed names the field and the setting, never a value."""
        found: list[_Marked] = []
        _walk(value, "", lambda marker, path: self._checked(marker, path, epoch, found))
        if not found:
            return value, None
        spend = Spend()
        for item in found:
            spend = spend + Spend(item.marker.epsilon, item.marker.delta)
        total = self._charge(spend, epoch, [item.path for item in found])
        noisy = iter(
            add_noise(
                item.values if item.values.ndim else float(item.values),
                item.marker.mechanism,
                noise_scale(item.marker),
                item.path,
            )
            for item in found
        )
        released = _walk(value, "", lambda _marker, _path: next(noisy))
        log.info(
            "central DP, epoch %d: noise drawn once for %d field(s), spent epsilon %g, delta %g",
            epoch,
            len(found),
            spend.epsilon,
            spend.delta,
        )
        return released, CentralRelease([item.path for item in found], spend, total)

    def _fail(self, epoch: int, text: str) -> RunFailed:
        return RunFailed(
            f"central DP refused epoch {epoch}'s aggregate: {text}", epoch=epoch, node=self.node_id
        )

    def _checked(self, marker: Any, path: str, epoch: int, found: list[_Marked]) -> Any:
        where = path or "the top"
        if isinstance(marker, Statistic):
            raise self._fail(
                epoch,
                f"a flame.dp statistic at {where!r} reads a node's column; the aggregator has "
                "no data: return it from analyze, or noise the aggregate with "
                "flame.dp.laplace/gaussian",
            )
        if not isinstance(marker, Noise):
            raise self._fail(
                epoch,
                f"a flame.dp marker at {where!r} sits inside an array or object the aggregator "
                "does not look into: put it in a dict, list or tuple",
            )
        if self.ledger is None:
            raise self._fail(
                epoch,
                f"aggregate returned flame.dp noise at {where!r}, but the aggregator has no "
                f"central-DP budget: set epsilon_budget in the aggregator's policy ({self.where})",
            )
        try:
            marker.check(path)
        except FlameError as exc:
            raise self._fail(epoch, f"{exc} (a forged marker)") from None
        if marker.contributors != 1:
            raise self._fail(
                epoch,
                f"flame.dp at {where!r}: contributors={marker.contributors} splits noise over "
                "nodes; the aggregator adds all of it (leave contributors at 1)",
            )
        values = _numbers(marker.values)
        if values is None:
            raise self._fail(
                epoch, f"flame.dp at {where!r}: values must be finite numbers (or arrays of them)"
            )
        found.append(_Marked(path, marker, values))
        return marker

    def _charge(self, spend: Spend, epoch: int, fields: list[str]) -> Spend:
        """The spend recorded in the ledger before any noise is drawn (all or nothing)."""
        assert self.ledger is not None
        try:
            return self.ledger.charge(spend, analysis=self.analysis_id, epoch=epoch)
        except PolicyRefused as exc:
            raise self._fail(
                epoch,
                f"{exc}; nothing was released. The aggregator's spends are kept in "
                f"{self.ledger.path}: raise epsilon_budget/delta_budget in the aggregator's "
                f"policy ({self.where}), or start a new ledger for a new dataset (budget_scope, "
                "or delete that file)",
            ) from None


def _numbers(values: Any) -> np.ndarray | None:
    """The marker's values as finite float64 (None: not numbers)."""
    if isinstance(values, (str, bytes, dict)):
        return None
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return array if np.isfinite(array).all() else None


def _walk(value: Any, path: str, visit: Callable[[Any, str], Any]) -> Any:
    """`value` rebuilt with each flame.dp marker replaced by `visit(marker, path)`."""
    if isinstance(value, (Noise, Statistic)):
        return visit(value, path)
    if isinstance(value, dict):
        new = {k: _walk(v, f"{path}.{k}" if path else str(k), visit) for k, v in value.items()}
        return value if all(new[k] is v for k, v in value.items()) else new
    if isinstance(value, (list, tuple)):
        items = [_walk(v, f"{path}[{i}]", visit) for i, v in enumerate(value)]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value  # untouched (a namedtuple stays one)
        return items if isinstance(value, list) else tuple(items)
    if (
        isinstance(value, np.ndarray)
        and value.dtype == object
        and any(isinstance(v, (Noise, Statistic)) for v in value.reshape(-1))
    ):
        return visit(None, path)  # refused by the checking visit
    return value

"""Central DP at the aggregator: noise added once to the aggregate, paid from its own budget.

For set-ups that trust the aggregator with the nodes' exact results (as the FLAME platform's
examples do). `aggregate` returns `flame.dp.laplace(total, sensitivity, epsilon)` or
`flame.dp.gaussian(...)` anywhere in its value (plain dicts, lists, tuples; a marker anywhere
else is refused); the aggregator runtime, never the aggregate code, checks a copy of every
marker made of exact numbers after its values are read (a forged one is refused), charges
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
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flame.dp import Noise, Statistic, add_noise, noise_scale, numbers, snapshot
from flame.errors import FlameError, PolicyRefused, RunFailed
from flame.privacy.ledger import BudgetLedger, Spend
from flame.privacy.policy import NodePolicy, read_policy
from flame.wire.tables import is_table

__all__ = ["AggregatorPolicy", "CentralDP", "load_aggregator_policy"]

log = logging.getLogger(__name__)

MARKERS = (Noise, Statistic)
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
        try:
            _walk(value, "", lambda marker, path: self._checked(marker, path, epoch, found))
        except _Unwalked as exc:
            raise self._fail(epoch, str(exc)) from None
        if not found:
            return _unmarked(value, epoch, self), None
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
        released = _unmarked(_walk(value, "", lambda _marker, _path: next(noisy)), epoch, self)
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
        if self.ledger is None:
            raise self._fail(
                epoch,
                f"aggregate returned flame.dp noise at {where!r}, but the aggregator has no "
                f"central-DP budget: set epsilon_budget in the aggregator's policy ({self.where})",
            )
        # the values first (their __array__/__float__ may rewrite the frozen marker), then a
        # copy of exact built-ins, checked: only the copy is charged and noised
        try:
            values = numbers(marker.values, path)
        except FlameError:
            raise self._fail(
                epoch, f"flame.dp at {where!r}: values must be finite numbers (or arrays of them)"
            ) from None
        copy = snapshot(marker, values)
        try:
            copy.check(path)
        except FlameError as exc:
            raise self._fail(epoch, f"{exc} (a forged marker)") from None
        if copy.contributors != 1:
            raise self._fail(
                epoch,
                f"flame.dp at {where!r}: contributors={copy.contributors} splits noise over "
                "nodes; the aggregator adds all of it (leave contributors at 1)",
            )
        found.append(_Marked(path, copy, values))
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


class _Unwalked(Exception):
    """A marker where the release does not look (its text names the place, never a value)."""


def _walk(value: Any, path: str, visit: Callable[[Any, str], Any]) -> Any:
    """`value` rebuilt with each flame.dp marker replaced by `visit(marker, path)`. Only exact
    dicts (read with dict.items), lists and tuples are walked: a subclass may answer items()
    or iteration with anything. A marker anywhere else (a table cell, a set, a dict key, a
    Mapping, an object array) is refused (_Unwalked), never passed on un-noised."""
    if isinstance(value, MARKERS):
        return visit(value, path)
    kind = type(value)
    if kind is dict:
        pairs = list(dict.items(value))
        new = {}
        for key, item in pairs:
            if type(key) not in _PLAIN and _holds_marker(key):
                raise _Unwalked(
                    f"a flame.dp marker is a dict key at {path or 'the top'!r}; keys are not "
                    "released: return a plain dict/list with the markers as values"
                )
            new[key] = _walk(item, f"{path}.{key}" if path else str(key), visit)
        return value if all(new[k] is v for k, v in pairs) else new
    if kind is list or kind is tuple:
        items = [_walk(v, f"{path}[{i}]", visit) for i, v in enumerate(value)]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return items if kind is list else tuple(items)
    if _holds_marker(value):
        what = (
            "an array of objects"
            if isinstance(value, np.ndarray)
            else f"a value of type {kind.__name__} (not a plain dict, list or tuple)"
        )
        raise _Unwalked(
            f"a flame.dp marker at {path or 'the top'!r} sits inside {what}, which the "
            "aggregator does not look into: return a plain dict/list of markers (e.g. "
            "{'total': flame.dp.laplace(...)}) and build tables from the released values"
        )
    return value


def _unmarked(value: Any, epoch: int, central: CentralDP) -> Any:
    """`value`, once no marker is left anywhere in it (the backstop before it is stored,
    sent or returned: a marker still inside would carry its exact values)."""
    if _holds_marker(value):
        raise central._fail(
            epoch, "a flame.dp marker is still in the aggregate after its release (refused)"
        )
    return value


_PLAIN = frozenset({str, bytes, bytearray, int, float, complex, bool, type(None), range})
_DEPTH = 200  # deeper than the wire sends (100): refused as holding one


def _holds_marker(value: Any, depth: int = 0) -> bool:
    """Whether a flame.dp marker is anywhere in `value`: dict keys and values (read from the
    dict itself), sequences, sets, Mappings, numpy object arrays at any depth, and pandas and
    polars tables (object cells, labels, attrs). Other objects are opaque here; the wire
    encoder sends none of them (and refuses any marker that reaches it)."""
    kind = type(value)
    if kind in _PLAIN:
        return False
    if isinstance(value, MARKERS) or depth > _DEPTH:
        return True
    inner = depth + 1
    if isinstance(value, np.ndarray):
        return value.dtype == object and any(
            type(v) not in _PLAIN and _holds_marker(v, inner) for v in value.flat
        )
    if isinstance(value, np.generic):
        return False
    if isinstance(value, dict):
        items: Iterable[Any] = [*dict.keys(value), *dict.values(value)]
    elif isinstance(value, (list, tuple, set, frozenset)):
        base: Any = next(b for b in (list, tuple, set, frozenset) if isinstance(value, b))
        items = list(base.__iter__(value))  # the container's own items, not its __iter__
    elif is_table(value):
        items = _table_parts(value)
    elif isinstance(value, Mapping):
        items = [part for pair in value.items() for part in pair]
    elif isinstance(value, (Sequence, Set)):  # deque, views, custom sequences
        items = list(value)
    else:
        return False
    return any(type(v) not in _PLAIN and _holds_marker(v, inner) for v in items)


def _table_parts(table: Any) -> list[Any]:
    """The parts of a pandas or polars table that can hold Python objects."""
    parts: list[Any] = []
    if type(table).__module__.startswith("polars"):
        columns = table.get_columns() if hasattr(table, "get_columns") else [table]
        return [c.to_list() for c in columns if "Object" in str(c.dtype)]
    if type(table).__module__.startswith("pyarrow"):
        return parts  # Arrow holds no Python objects
    frame = table.to_frame() if hasattr(table, "to_frame") else table
    parts.extend([dict(table.attrs), list(frame.columns), _labels(frame.index)])
    for position in range(frame.shape[1]):
        column = frame.iloc[:, position]
        if column.dtype == object:
            parts.append(column.tolist())
        elif str(column.dtype) == "category":
            parts.append(_labels(column.cat.categories))
    return parts


def _labels(index: Any) -> list[Any]:
    return index.tolist() if index.dtype == object or str(index.dtype) == "category" else []

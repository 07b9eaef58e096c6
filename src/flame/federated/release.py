"""What may leave the node: the policy checked by the runtime on what `analyze` returned.

Order per epoch: before `analyze` (epoch limit, declared privacy spend against the ledger);
after it (rows read against `min_rows`, small cells of `flame.counts`, noise for `flame.dp`
markers, the spend charged to the ledger). Only then is the result encrypted and signed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from flame.disclosure import Counts, apply_cell_rule
from flame.dp import Noise, add_noise, noise_scale
from flame.errors import FlameError, PolicyRefused
from flame.federated.secure import Secure
from flame.isolation.runner import Outcome
from flame.ledger import BudgetLedger, Spend
from flame.policy import NodePolicy

__all__ = ["Gate", "Release"]

log = logging.getLogger(__name__)


@dataclass
class Release:
    """The releasable result and what the runtime did to it (for status and manifest)."""

    result: Any
    spend: Spend = field(default_factory=Spend)
    suppressed: dict[str, int] = field(default_factory=dict)
    total_spent: Spend | None = None

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = {"spend": self.spend.as_dict()}
        if self.total_spent is not None:
            report["spent_total"] = self.total_spent.as_dict()
        if self.suppressed:
            report["suppressed"] = dict(self.suppressed)
        return report


class Gate:
    """One node's policy enforcement, in the runtime process."""

    def __init__(
        self,
        policy: NodePolicy,
        *,
        node_id: str,
        analysis_id: str,
        min_contributors: int | None = None,
    ) -> None:
        self.policy = policy
        self.node_id = node_id
        self.analysis_id = analysis_id
        self.min_contributors = min_contributors  # fewest contributions a decrypted sum holds
        self.ledger: BudgetLedger | None = None
        if policy.epsilon_budget is not None:
            if policy.ledger_dir is None:
                raise FlameError("the node policy has a budget but no ledger_dir")
            self.ledger = BudgetLedger(
                policy.ledger_dir,
                node_id,
                policy.budget_scope,
                policy.epsilon_budget,
                policy.delta_budget,
            )

    def before(self, epoch: int, declared: Any) -> None:
        """Refuse an epoch before `analyze` reads anything."""
        limit = self.policy.max_epochs
        if limit is not None and epoch >= limit:
            raise PolicyRefused(
                f"epoch {epoch}: this node answers at most {limit} epoch(s) (rule: max_epochs)"
            )
        if self.ledger is not None and isinstance(declared, dict):
            spend = Spend(float(declared.get("epsilon", 0)), float(declared.get("delta", 0)))
            self.ledger.check(spend, f"the analysis (declared per epoch, epoch {epoch})")

    def release(self, epoch: int, outcome: Outcome) -> Release:
        """The result as it may leave the node; PolicyRefused names the field and rule."""
        minimum = self.policy.min_rows
        if minimum is not None and outcome.rows_read < minimum:
            raise PolicyRefused(
                f"epoch {epoch}: analyze read fewer rows than this node's min_rows = {minimum}; "
                "result refused (rule: min_rows)"
            )
        release = Release(None)
        release.result = self._resolve(outcome.result, "", False, release)
        if release.spend.epsilon > 0 or release.spend.delta > 0:
            if self.ledger is not None:
                release.total_spent = self.ledger.charge(
                    release.spend, analysis=self.analysis_id, epoch=epoch
                )
        elif self.ledger is not None:
            release.total_spent = self.ledger.spent()
        return release

    def _resolve(self, value: Any, path: str, encrypted: bool, release: Release) -> Any:
        if isinstance(value, Secure):
            return replace(value, values=self._resolve(value.values, path, True, release))
        if isinstance(value, Counts) and isinstance(value.values, dict):
            return {  # a dict of cells (e.g. {"F|<40": 3, ...}): the rule per entry
                k: self._resolve(Counts(v), f"{path}.{k}" if path else str(k), encrypted, release)
                for k, v in value.values.items()
            }
        if isinstance(value, Counts):
            inner = self._resolve(value.values, path, encrypted, release)
            released, hidden = apply_cell_rule(
                inner,
                path=path,
                min_count=self.policy.min_cell_count,
                mode=self.policy.on_small_cell,
                zero_is_small=self.policy.count_zero_as_small,
                encrypted=encrypted,
            )
            if hidden:
                release.suppressed[path or "value"] = hidden
            return released
        if isinstance(value, Noise):
            try:
                value.check(path)
            except FlameError as exc:
                raise PolicyRefused(str(exc)) from None
            if value.contributors > 1 and not encrypted:
                raise PolicyRefused(
                    f"field {path or 'value'!r}: distributed noise (contributors="
                    f"{value.contributors}) is only safe inside flame.secure(...)"
                )
            floor = self.min_contributors
            if value.contributors > 1 and (floor is None or value.contributors > floor):
                raise PolicyRefused(
                    f"field {path or 'value'!r}: distributed noise split over "
                    f"{value.contributors} contributors, but a decrypted sum is only "
                    f"guaranteed {floor or 1} (secure.min_contributors); each node would add "
                    "too little noise (rule: contributors <= min_contributors)"
                )
            inner = self._resolve(value.values, path, encrypted, release)
            scale = noise_scale(value)
            noisy = add_noise(inner, value.mechanism, scale, path)
            release.spend = release.spend + Spend(value.epsilon, value.delta)
            return noisy
        if isinstance(value, dict):
            return {
                k: self._resolve(v, f"{path}.{k}" if path else str(k), encrypted, release)
                for k, v in value.items()
            }
        if isinstance(value, (list, tuple)):
            return [
                self._resolve(v, f"{path}[{i}]", encrypted, release) for i, v in enumerate(value)
            ]
        return value

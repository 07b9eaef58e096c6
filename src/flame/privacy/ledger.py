"""The privacy-budget ledger: what a node's dataset has spent, on the node's own disk.

One JSON file per (node, budget scope), rewritten atomically under a file lock, so it
survives restarts and two runs on one node cannot both spend the last of a budget. Every
release is recorded (analysis, epoch, epsilon, delta, time) before the result is sent.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flame.errors import PolicyRefused

__all__ = ["BudgetLedger", "Spend"]

log = logging.getLogger(__name__)
_SLACK = 1e-12


@dataclass(frozen=True)
class Spend:
    """Privacy loss of one release (basic composition: epsilons and deltas add)."""

    epsilon: float = 0.0
    delta: float = 0.0

    def __add__(self, other: Spend) -> Spend:
        return Spend(self.epsilon + other.epsilon, self.delta + other.delta)

    def as_dict(self) -> dict[str, float]:
        return {"epsilon": self.epsilon, "delta": self.delta}


class BudgetLedger:
    """The budget of one dataset (`scope`) on one node."""

    def __init__(
        self, folder: Path, node_id: str, scope: str, epsilon_budget: float, delta_budget: float
    ) -> None:
        self.path = Path(folder) / f"{node_id}--{scope}.json"
        self.scope = scope
        self.node_id = node_id
        self.budget = Spend(epsilon_budget, delta_budget)

    # --- reading -----------------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"scope": self.scope, "node": self.node_id, "entries": []}
        except (OSError, ValueError) as exc:
            raise PolicyRefused(
                f"the privacy budget ledger {self.path.name} cannot be read ({exc}); "
                "refusing to spend until the operator repairs it"
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise PolicyRefused(f"the privacy budget ledger {self.path.name} is malformed")
        return data

    def spent(self) -> Spend:
        total = Spend()
        for entry in self._read()["entries"]:
            total = total + Spend(float(entry["epsilon"]), float(entry["delta"]))
        return total

    def remaining(self) -> Spend:
        spent = self.spent()
        return Spend(
            max(self.budget.epsilon - spent.epsilon, 0.0), max(self.budget.delta - spent.delta, 0.0)
        )

    def check(self, spend: Spend, what: str) -> None:
        """PolicyRefused if `spend` does not fit in what is left (nothing is recorded)."""
        self._fits(self.spent(), spend, what)

    def _fits(self, spent: Spend, spend: Spend, what: str) -> None:
        if spent.epsilon + spend.epsilon > self.budget.epsilon + _SLACK:
            raise PolicyRefused(
                f"{what} would spend epsilon {spend.epsilon:g}, but the budget of dataset "
                f"{self.scope!r} has {max(self.budget.epsilon - spent.epsilon, 0):g} of "
                f"{self.budget.epsilon:g} left (rule: epsilon_budget)"
            )
        if spent.delta + spend.delta > self.budget.delta + _SLACK:
            raise PolicyRefused(
                f"{what} would spend delta {spend.delta:g}, but the budget of dataset "
                f"{self.scope!r} has {max(self.budget.delta - spent.delta, 0):g} of "
                f"{self.budget.delta:g} left (rule: delta_budget)"
            )

    # --- spending ----------------------------------------------------------------------------
    def charge(self, spend: Spend, *, analysis: str, epoch: int) -> Spend:
        """Record a release (refusing it if it does not fit); returns the total spent."""
        with self._locked():
            data = self._read()
            spent = Spend()
            for entry in data["entries"]:
                spent = spent + Spend(float(entry["epsilon"]), float(entry["delta"]))
            self._fits(spent, spend, f"epoch {epoch}")
            data["entries"].append(
                {
                    "analysis": analysis,
                    "epoch": epoch,
                    "epsilon": spend.epsilon,
                    "delta": spend.delta,
                    "time": time.time(),
                }
            )
            self._write(data)
        log.info(
            "privacy budget %s: spent epsilon %g, delta %g in epoch %d",
            self.scope,
            spend.epsilon,
            spend.delta,
            epoch,
        )
        return spent + spend

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, data: dict[str, Any]) -> None:
        temporary = self.path.with_suffix(".tmp")
        with open(temporary, "w") as stream:
            json.dump(data, stream, indent=1)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

"""The privacy-budget ledger: what a node's dataset has spent, on the node's own disk.

One JSON file per (node, budget scope), rewritten atomically under a file lock, so it
survives restarts and two runs on one node cannot both spend the last of a budget. Every
release is recorded (analysis, epoch, epsilon, delta, time) before the result is sent.
Only finite non-negative spends are recorded, and a ledger holding anything else (NaN would
make every charge fit, a negative entry is a refund) refuses to spend until repaired.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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

    def _total(self, data: dict[str, Any]) -> Spend:
        """The sum of the recorded spends. PolicyRefused (fail closed) if any entry is not a
        finite non-negative number: a NaN makes every later comparison false (the budget
        would be off for good), a negative one is a refund nobody granted."""
        epsilon = delta = 0.0
        for entry in data["entries"]:
            pair = _amounts(entry)
            if pair is None:
                raise PolicyRefused(
                    f"the privacy budget ledger {self.path.name} holds an entry that is not a "
                    "finite non-negative spend; refusing to spend until the operator repairs it"
                )
            epsilon, delta = epsilon + pair[0], delta + pair[1]
        return Spend(epsilon, delta)

    def spent(self) -> Spend:
        return self._total(self._read())

    def remaining(self) -> Spend:
        spent = self.spent()
        return Spend(
            max(self.budget.epsilon - spent.epsilon, 0.0), max(self.budget.delta - spent.delta, 0.0)
        )

    def check(self, spend: Spend, what: str) -> None:
        """PolicyRefused if `spend` does not fit in what is left (nothing is recorded)."""
        self._fits(self.spent(), _valid(spend, what), what)

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
        spend = _valid(spend, f"epoch {epoch}")
        with self._locked():
            data = self._read()
            spent = self._total(data)
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
            json.dump(data, stream, indent=1, allow_nan=False)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _number(value: Any) -> float | None:
    """`value` as a finite non-negative float (None: not one). Exact types only: a float
    subclass could answer arithmetic with whatever it likes."""
    if type(value) not in (int, float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def _amounts(entry: Any) -> tuple[float, float] | None:
    if not isinstance(entry, dict):
        return None
    epsilon, delta = _number(entry.get("epsilon")), _number(entry.get("delta"))
    return None if epsilon is None or delta is None else (epsilon, delta)


def _valid(spend: Spend, what: str) -> Spend:
    """`spend` of exact finite non-negative floats; PolicyRefused for anything else (a NaN or
    negative charge would disable or refund the budget)."""
    epsilon, delta = _number(_exact(spend.epsilon)), _number(_exact(spend.delta))
    if epsilon is None or delta is None:
        raise PolicyRefused(
            f"{what}: a spend must be finite non-negative numbers; nothing was recorded"
        )
    return Spend(epsilon, delta)


def _exact(value: Any) -> Any:
    """A numpy or subclassed float as a plain float (through float(); anything else as is)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return value
    return float(value)

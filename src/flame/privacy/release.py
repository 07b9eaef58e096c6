"""What may leave the node: the policy checked by the runtime on what `analyze` returned
and on every message `analyze` sends (`flame.context().send`).

Order per epoch: before `analyze` (epoch limit, declared privacy spend against the ledger);
after it (rows read against `min_rows`, small cells of `flame.counts`, noise for `flame.dp`
markers, the spend charged to the ledger). Only then is the result encrypted and signed.
A message passes the same checks when it is sent (rows read so far), one body for all its
recipients; a refused message fails the epoch, even if `analyze` catches the error.
Under `release = "protected"` (an allow-list) a value outside every flame.dp marker and
flame.secure is refused in the same walk, before anything is charged or sent
(`flame.privacy.protected` says why flame.counts alone is not enough).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from flame.data import Data
from flame.data.sources.descriptor import open_read_only
from flame.data.sources.local import LocalSource
from flame.dp import (
    Noise,
    Statistic,
    add_noise,
    measure,
    noise_scale,
    numbers,
    snapshot,
    statistic_snapshot,
)
from flame.errors import FlameError, PolicyRefused
from flame.isolation.inprocess import Outcome
from flame.privacy.disclosure import Counts, apply_cell_rule
from flame.privacy.ledger import BudgetLedger, Spend
from flame.privacy.policy import NodePolicy
from flame.privacy.protected import unprotected
from flame.secure.marked import Secure
from flame.utils.hints import did_you_mean, name_list

__all__ = ["ColumnReader", "Gate", "Release", "column_reader"]

ColumnReader = Callable[[str, "str | None", "str | None"], np.ndarray]
"""(column, file, source) -> the column as float64 (NaN where missing), read by the runtime."""


def column_reader(data: Any, hidden: Sequence[str] = ()) -> ColumnReader | None:
    """How the runtime reads a column of the node's data for flame.dp statistics (CSV files
    of a `Data`; None for anything else). Only files the analysis child itself may open:
    none that leads (through a symlink) into one of the node's `hidden` paths."""
    if not isinstance(data, Data):
        return None

    def read(column: str, file: str | None, source: str | None) -> np.ndarray:
        try:
            files = data._files_source(source)
            if isinstance(files, LocalSource) and hidden:
                for name in [file] if file is not None else data.files("*.csv", source=source):
                    os.close(open_read_only(files.root, name, hidden))  # as for the child
            table = data.read_csv(file, source=source)
        except Exception as exc:  # a parser's words may quote a record (a malformed row)
            log.warning("flame.dp could not read the node's CSV data: %s", exc)
            raise PolicyRefused(
                "flame.dp: the node could not read its CSV data for this statistic (the "
                "reason is in the node's log, not sent: it may quote a record)"
            ) from None
        if column not in table:
            hint = did_you_mean(column, table)
            raise PolicyRefused(
                f"flame.dp: the node's data has no column {column[:64]!r}{hint}; its columns: "
                f"{name_list(table)}"
            )
        values = np.asarray(table[column])
        if values.dtype.kind not in "biuf":
            raise PolicyRefused(f"flame.dp: column {column[:64]!r} is not numeric")
        return values.astype(np.float64)

    return read


log = logging.getLogger(__name__)


def _spends(spend: Spend) -> bool:
    return spend.epsilon > 0 or spend.delta > 0


def _name(mechanism: Any) -> str:
    """A noise marker's mechanism for an error (a forged one is not echoed)."""
    return mechanism if mechanism in ("laplace", "gaussian") else "laplace/gaussian"


@dataclass
class Release:
    """The releasable result and what the runtime did to it (for status and manifest)."""

    result: Any
    spend: Spend = field(default_factory=Spend)
    suppressed: dict[str, int] = field(default_factory=dict)
    total_spent: Spend | None = None
    covered: list[int] = field(default_factory=list)  # records each runtime statistic read
    messages: Release | None = None  # what analyze's messages spent this epoch (count: result)
    noisy_refusal: bool = False  # a refusal was decided on noised values: charge their noise

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = {"spend": self.spend.as_dict()}
        if self.total_spent is not None:
            report["spent_total"] = self.total_spent.as_dict()
        if self.suppressed:
            report["suppressed"] = dict(self.suppressed)
        if self.messages is not None:
            sent: dict[str, Any] = {"sent": self.messages.result}
            sent["spend"] = self.messages.spend.as_dict()
            if self.messages.suppressed:
                sent["suppressed"] = dict(self.messages.suppressed)
            report["messages"] = sent
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
        self._sent: dict[int, Release] = {}  # per epoch: messages let out (count in .result)
        self._refused: dict[int, str] = {}  # per epoch: why a message was refused
        self.reader: ColumnReader | None = None  # set by the node: its data, for statistics
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
        release = self._checked(epoch, outcome.result, outcome.rows_read, "result")
        sent = self._sent.pop(epoch, None)
        if sent is not None:  # what this epoch's messages spent and suppressed, for the report
            release.messages = sent
        if self.ledger is not None and release.total_spent is None:
            release.total_spent = self.ledger.spent()
        return release

    def message(self, epoch: int, body: Any, rows_read: int) -> Any:
        """A body `analyze` sends to other nodes, as it may leave the node: the result's checks
        (min_rows on the rows read so far, marker rules, noise and budget). PolicyRefused
        names the rule, never the body; the refusal is kept to fail the epoch (`refused`)."""
        try:
            if not self.policy.allow_messages:
                raise PolicyRefused(
                    f"epoch {epoch}: this node's policy does not let analyze send messages; "
                    "message refused (rule: allow_messages)"
                )
            release = self._checked(epoch, body, rows_read, "message")
        except PolicyRefused as exc:
            self._refused.setdefault(epoch, str(exc))
            raise
        except FlameError as exc:  # a malformed marker: refused like one in a result
            self._refused.setdefault(epoch, str(exc))
            raise PolicyRefused(str(exc)) from None
        sent = self._sent.setdefault(epoch, Release(None))
        sent.result = int(sent.result or 0) + 1
        sent.spend = sent.spend + release.spend
        for field_path, hidden in release.suppressed.items():
            sent.suppressed[field_path] = sent.suppressed.get(field_path, 0) + hidden
        return release.result

    def lets_progress_out(self, rows_read: int) -> bool:
        """Whether analyze's progress may go out in the node's status: it is a number the
        analysis picks, a small message, so it needs allow_messages and min_rows met, and
        (an unprotected number) never leaves under release = "protected"."""
        minimum = self.policy.min_rows
        if self.policy.release == "protected":
            return False
        return self.policy.allow_messages and (minimum is None or rows_read >= minimum)

    def refused(self, epoch: int) -> None:
        """PolicyRefused if a message of this epoch was refused: the epoch fails with the
        node's own reason, whatever `analyze` did with the error (caught it, or failed)."""
        reason = self._refused.pop(epoch, None)
        if reason is not None:
            raise PolicyRefused(reason)

    def _checked(self, epoch: int, body: Any, rows_read: int, what: str) -> Release:
        """`body` resolved under the policy and its spend charged (nothing if refused)."""
        minimum = self.policy.min_rows
        if minimum is not None and rows_read < minimum and rows_read > 0:
            raise PolicyRefused(
                f"epoch {epoch}: analyze read fewer rows than this node's min_rows = {minimum}; "
                f"{what} refused (rule: min_rows)"
            )
        release = Release(None)
        try:
            release.result = self._resolve(body, "", False, release, what == "result")
        except PolicyRefused:
            # the refusal itself says something about the noisy values it was decided on
            # (e.g. a noisy count below min_cell_count): uncharged, reruns would average the
            # noise away for free; each draw was checked against the budget, so it fits
            if release.noisy_refusal and self.ledger is not None and _spends(release.spend):
                self.ledger.charge(release.spend, analysis=self.analysis_id, epoch=epoch)
            raise
        # each runtime statistic must cover min_rows records; analyze that read nothing
        # itself and releases only such statistics is judged by them
        short = minimum is not None and (
            min(release.covered, default=minimum) < minimum
            or (rows_read < minimum and not (rows_read == 0 and release.covered))
        )
        if short:
            raise PolicyRefused(
                f"epoch {epoch}: analyze read (or a flame.dp statistic covers) fewer rows than "
                f"this node's min_rows = {minimum}; "
                f"{what} refused (rule: min_rows)"
            )
        if _spends(release.spend) and self.ledger is not None:
            release.total_spent = self.ledger.charge(
                release.spend, analysis=self.analysis_id, epoch=epoch
            )
        return release

    def _resolve(
        self,
        value: Any,
        path: str,
        encrypted: bool,
        release: Release,
        result: bool = True,
        noised: bool = False,
    ) -> Any:
        """`value` as it may leave: markers resolved, each value checked against the rules;
        `encrypted`/`noised`: it is inside flame.secure / a flame.dp marker."""
        if isinstance(value, Secure):
            if not result:
                raise PolicyRefused(
                    f"field {path or 'value'!r}: flame.secure(...) in a message: messages are "
                    "not encrypted, only results are (rule: messages are checked like results)"
                )
            return replace(value, values=self._resolve(value.values, path, True, release))
        if isinstance(value, Counts) and isinstance(value.values, dict):
            return {  # a dict of cells (e.g. {"F|<40": 3, ...}): the rule per entry
                k: self._resolve(
                    Counts(v), f"{path}.{k}" if path else str(k), encrypted, release, result, noised
                )
                for k, v in value.values.items()
            }
        if isinstance(value, Counts):
            spent_before = release.spend
            inner = self._resolve(value.values, path, encrypted, release, result, noised)
            try:
                released, hidden = apply_cell_rule(
                    inner,
                    path=path,
                    min_count=self.policy.min_cell_count,
                    mode=self.policy.on_small_cell,
                    zero_is_small=self.policy.count_zero_as_small,
                    encrypted=encrypted,
                )
            except PolicyRefused:
                release.noisy_refusal = release.spend != spent_before  # decided on noise
                raise
            if hidden and self.policy.release != "protected":  # a count the analysis steers
                release.suppressed[path or "value"] = hidden
            return released
        if isinstance(value, Statistic):
            return self._statistic(value, path, encrypted, release)
        if isinstance(value, Noise):
            if self.policy.derives_sensitivity:
                raise PolicyRefused(
                    f"field {path or 'value'!r}: flame.dp.{_name(value.mechanism)} takes the "
                    "analysis's own sensitivity; this node derives it from its public bounds: "
                    "use flame.dp.sum/mean/count/histogram (rule: trust_sensitivity = false)"
                )
            inner = self._resolve(value.values, path, encrypted, release, result, True)
            return self._noise(value, inner, path, encrypted, release)
        if isinstance(value, dict):  # its own items (a subclass's items() could hide one)
            return {
                k: self._resolve(
                    v, f"{path}.{k}" if path else str(k), encrypted, release, result, noised
                )
                for k, v in dict.items(value)
            }
        if isinstance(value, (list, tuple)):
            items = list.__iter__(value) if isinstance(value, list) else tuple.__iter__(value)
            return [
                self._resolve(v, f"{path}[{i}]", encrypted, release, result, noised)
                for i, v in enumerate(items)
            ]
        if self.policy.release == "protected" and not (noised or value is None):
            # flame.secure alone is no protection against the analysis: code that puts each
            # node's record in its own slot makes the sum the list of records
            where = "inside flame.secure, " if encrypted else ""
            raise PolicyRefused(
                f"field {path or 'value'!r}: {where}{unprotected(value)} leaves without noise; "
                "this node releases only values it noised (flame.dp.*, also inside "
                "flame.secure) (rule: release = protected)"
            )
        return value

    def _noise(
        self, marker: Noise, values: Any, path: str, encrypted: bool, release: Release
    ) -> Any:
        """`values` (the marker's, resolved) with the marker's noise, its spend added to the
        release. Values are converted first (in process, the analyst's __array__ may rewrite
        the frozen marker), then the marker is copied from exact built-ins and the copy is
        checked, charged and noised."""
        try:
            value = snapshot(marker, numbers(values, path))
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
                f"guaranteed {floor or 1} (secure.min_contributors, "
                "FLAME_SECURE__MIN_CONTRIBUTORS); each node would add too little noise "
                "(rule: contributors <= min_contributors)"
            )
        spend = release.spend + Spend(value.epsilon, value.delta)
        if self.ledger is not None:  # before the draw: no noise the budget cannot pay for
            self.ledger.check(spend, f"field {path or 'value'!r}")
        noisy = add_noise(value.values, value.mechanism, noise_scale(value), path)  # the copy
        release.spend = spend
        return noisy

    def _statistic(self, stat: Statistic, path: str, encrypted: bool, release: Release) -> Any:
        """A runtime statistic: the column read here, clipped to the holder's bounds, its
        sensitivity derived by OpenDP, never taken from the analysis."""
        field_name = path or "value"
        try:
            stat = statistic_snapshot(stat)  # exact built-ins, read once: what is checked is used
            stat.check(path)
        except FlameError as exc:
            raise PolicyRefused(str(exc)) from None
        if stat.kind == "mean" and encrypted:
            raise PolicyRefused(
                f"field {field_name!r}: a mean does not add up across nodes; inside "
                "flame.secure use flame.dp.sum and flame.dp.count"
            )
        if self.reader is None:
            raise PolicyRefused(
                f"field {field_name!r}: flame.dp.{stat.kind} needs the node's CSV data"
            )
        column = self.reader(stat.column, stat.file, stat.source)
        values = column[~np.isnan(column)]
        release.covered.append(int(values.size))  # missing values are in no statistic
        bounds = None
        if stat.kind in ("sum", "mean"):
            bounds = self.policy.bounds_for(stat.column)
            if bounds is None:
                name = stat.column[:64]
                declare = f"[dp_bounds] {name} = [lower, upper]"
                if not self.policy.model_fields_set:
                    where = (
                        "no node policy was given: give one declaring "
                        f"{declare} (flame simulate --policy FILE, FLAME_POLICY on a node, "
                        "policy= in flame.simulate)"
                    )
                else:
                    where = f"this node's policy declares none: add {declare} (or dp_clamp) to it"
                raise PolicyRefused(
                    f"field {field_name!r}: flame.dp.{stat.kind} of column {name!r}: no public "
                    f"bounds for it; {where} (rule: dp_bounds, dp_clamp)"
                )
        if stat.kind != "mean":
            exact, sensitivity = measure(stat.kind, values, bounds, stat.bins, stat.mechanism)
            marker = Noise(
                exact, stat.mechanism, sensitivity, stat.epsilon, stat.delta, stat.contributors
            )
            return self._noise(marker, exact, path, encrypted, release)
        assert bounds is not None
        halves = []
        for kind in ("sum", "count"):
            exact, sensitivity = measure(kind, values, bounds, None, stat.mechanism)
            marker = Noise(exact, stat.mechanism, sensitivity, stat.epsilon / 2, stat.delta / 2)
            halves.append(float(self._noise(marker, exact, path, encrypted, release)))
        total, n = halves
        return float(np.clip(total / max(n, 1.0), bounds[0], bounds[1]))

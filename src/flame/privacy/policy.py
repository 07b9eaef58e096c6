"""The node policy: disclosure rules and the privacy budget, owned by the node's operator.

It is a file named by `FLAME_POLICY` (TOML, YAML or JSON) on each analysis node. Nothing the
aggregator sends and nothing the analysis does changes it: it is read by the node runtime
before the analysis child starts, and enforced by that runtime on every result.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flame.errors import ConfigError
from flame.utils.hints import did_you_mean, name_list

__all__ = ["NodePolicy", "load_policy", "read_policy"]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


class NodePolicy(BaseModel):
    """What this node lets leave it. The defaults enforce nothing beyond isolation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_cell_count: int | None = Field(
        None, ge=1, description="values marked flame.counts(...) below this are small cells"
    )
    on_small_cell: Literal["suppress", "refuse"] = Field(
        "suppress", description="suppress: the cell is masked; refuse: the epoch fails"
    )
    count_zero_as_small: bool = Field(
        False, description="treat empty cells (0) as small too (default: 0 is not disclosive)"
    )
    min_rows: int | None = Field(
        None, ge=1, description="an epoch whose analyze read fewer rows is refused"
    )
    max_epochs: int | None = Field(None, ge=1, description="epochs this node answers at most")
    epsilon_budget: float | None = Field(
        None, ge=0, description="total epsilon this node's dataset may spend (None: no DP limit)"
    )
    delta_budget: float = Field(0.0, ge=0, lt=1, description="total delta it may spend")
    budget_scope: str = Field(
        "default", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="the dataset the budget is of"
    )
    ledger_dir: Path | None = Field(
        None, description="where the budget ledger lives (default: .flame-ledger beside the policy)"
    )
    dp_bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="public [lower, upper] per column: flame.dp.sum/mean clip to them and "
        "derive the sensitivity from them",
    )
    dp_clamp: tuple[float, float] | None = Field(
        None, description="bounds for a column dp_bounds does not name (None: refused)"
    )
    trust_sensitivity: bool = Field(
        False,
        description="under an epsilon_budget, release flame.dp.laplace/gaussian with the "
        "analysis's own sensitivity claim (only for reviewed code)",
    )
    release: Literal["any", "protected"] = Field(
        "any",
        description="any: unmarked values leave as they are (the rules apply to marked ones); "
        "protected: every value that leaves must be noised by this node (flame.dp.*, also "
        "inside flame.secure); anything else refuses the epoch. Needs epsilon_budget and "
        "isolate = true",
    )
    share_aggregate: bool = Field(
        True, description="whether this node asks to receive other sites' aggregates"
    )
    forward_logs: bool = Field(False, description="whether analysis logs may leave the node")
    send_tracebacks: bool = Field(
        True,
        description="whether a failing analysis's traceback and error message may leave the "
        "node; default true, but false when this policy protects records (epsilon_budget, "
        "min_cell_count or min_rows set, or release = protected) and does not set it "
        "itself: an analysis's own error text can quote a data value",
    )
    allow_messages: bool = Field(
        True, description="whether an isolated analyze may send free-form messages to nodes"
    )
    isolate: bool = Field(True, description="run analyze in a child process without secrets")
    cut_network: bool = Field(True, description="take the child's network away where possible")

    @model_validator(mode="after")
    def _budget(self) -> NodePolicy:
        if self.delta_budget > 0 and self.epsilon_budget is None:
            raise ValueError("delta_budget: set epsilon_budget too (the ledger tracks both)")
        if self.release == "protected":
            if self.epsilon_budget is None:  # without one, any epsilon is noise in name only
                raise ValueError(
                    'release = "protected": set epsilon_budget (and ledger_dir) too; without a '
                    "budget an analysis may spend any epsilon"
                )
            if not self.isolate:  # code in the runtime's own process can undo any rule
                raise ValueError('release = "protected" needs isolate = true')
        return self

    @model_validator(mode="after")
    def _tracebacks(self) -> NodePolicy:
        """A policy that protects records keeps error text home unless it says otherwise
        (not marked as set: `quoted_may_leave` still needs an explicit true)."""
        protects = (
            self.epsilon_budget is not None
            or self.min_cell_count is not None
            or self.min_rows is not None
            or self.release == "protected"
        )
        if protects and "send_tracebacks" not in self.model_fields_set:
            object.__setattr__(self, "send_tracebacks", False)
        return self

    @model_validator(mode="after")
    def _bounds(self) -> NodePolicy:
        named = {f"dp_bounds.{k}": v for k, v in self.dp_bounds.items()}
        if self.dp_clamp is not None:
            named["dp_clamp"] = self.dp_clamp
        for name, (lower, upper) in named.items():
            if not (math.isfinite(lower) and math.isfinite(upper) and lower <= upper):
                raise ValueError(f"{name}: [lower, upper] must be finite with lower <= upper")
        return self

    @property
    def enforces_budget(self) -> bool:
        return self.epsilon_budget is not None

    @property
    def derives_sensitivity(self) -> bool:
        """Whether DP is required here (a budget) and its sensitivity is the node's to derive:
        then only runtime statistics (flame.dp.sum/mean/count/histogram) are released."""
        return self.enforces_budget and not self.trust_sensitivity

    def bounds_for(self, column: str) -> tuple[float, float] | None:
        """The holder's public bounds of `column` (dp_bounds, else dp_clamp, else None)."""
        return self.dp_bounds.get(column, self.dp_clamp)

    def summary(self) -> dict[str, Any]:
        """The policy as JSON-ready data (for `flame check` and the node's status)."""
        data = self.model_dump(mode="json")
        return data


def load_policy(path: str | Path | None, *, base: Path | None = None) -> NodePolicy:
    """The policy in `path` (None: the default policy); errors name the file and the field."""
    if path is None:
        return NodePolicy()
    return read_policy(Path(path), NodePolicy, base=base)


def read_policy(
    path: Path,
    model: type[M],
    *,
    base: Path | None = None,
    ignore: Collection[str] = (),
    what: str = "policy",
) -> M:
    """A policy file as `model`: errors name the file and the field; keys in `ignore` (rules
    of another role's policy, e.g. a node's in a file the aggregator shares) are dropped
    with a warning; a relative ledger_dir is beside the file, and the default one
    .flame-ledger there (or in `base`)."""
    from flame.config import read_config_file

    try:
        raw = read_config_file(path)
    except ConfigError as exc:
        raise ConfigError(re.sub(r"^FLAME_CONFIG", "FLAME_POLICY", str(exc))) from None
    dropped = sorted(key for key in raw if key in ignore)
    if dropped:
        log.warning(
            "FLAME_POLICY %s: %s do(es) not apply to this %s; ignored",
            path,
            ", ".join(dropped),
            what,
        )
        raw = {key: value for key, value in raw.items() if key not in ignore}
    if raw.get("ledger_dir") is not None and not Path(str(raw["ledger_dir"])).is_absolute():
        raw["ledger_dir"] = str((path.parent / str(raw["ledger_dir"])).resolve())
    try:
        policy = model.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "policy"
            message = error["msg"]
            if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
                known = model.model_fields
                hint = did_you_mean(where, known) or f"; the settings: {name_list(known, 30)}"
                article = "an" if what[:1] in "aeiou" else "a"
                message = f"is not {article} {what} setting{hint}"
            lines.append(f"FLAME_POLICY {path}: {where}: {message}")
        raise ConfigError("\n".join(lines)) from None
    if getattr(policy, "ledger_dir", "absent") is None:
        folder = (base or path.parent).resolve() / ".flame-ledger"
        policy = policy.model_copy(update={"ledger_dir": folder})
    return policy

"""What `flame check` reports: one verdict per item, and the report they make together."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from flame.config import FlameConfig
from flame.utils.logs import mask_credentials

__all__ = ["CheckItem", "CheckReport", "CheckRun", "Verdict", "masked"]

Verdict = Literal["ok", "FAIL", "skip"]


@dataclass(frozen=True)
class CheckItem:
    """One line of the report."""

    verdict: Verdict
    name: str
    target: str = ""
    detail: str = ""
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict != "FAIL"

    def line(self) -> str:
        text = f"{self.verdict:<4} {self.name}"
        if self.target:
            text += f" {self.target}"
        if self.detail:
            text += f": {self.detail}"
        if self.fix and self.verdict == "FAIL":
            text += f" \u2014 {self.fix}"
        return text


@dataclass
class CheckReport:
    items: list[CheckItem] = field(default_factory=list)

    @property
    def failed(self) -> list[CheckItem]:
        return [item for item in self.items if item.verdict == "FAIL"]

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class CheckRun:
    """What every check is given: the node's config, the time it may wait per service, and
    the services whose token failed (not contacted: they would fail for the same reason)."""

    config: FlameConfig
    timeout: float
    failed_tokens: frozenset[str] = frozenset()


def masked(item: CheckItem, secrets: list[str]) -> CheckItem:
    """The item with every configured secret masked in its target and detail."""
    return CheckItem(
        item.verdict,
        item.name,
        mask_credentials(item.target, secrets),
        mask_credentials(item.detail, secrets),
        item.fix,
    )

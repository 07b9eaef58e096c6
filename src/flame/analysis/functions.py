"""The analyst's functions, called with just the arguments they ask for.

`def analyze(data)` is as valid as `def analyze(data, epoch, previous)`; what a function
cannot take is reported when it is loaded, not in the middle of a run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flame.errors import AnalysisLoadError

__all__ = ["AnalysisFunctions"]

_ALLOWED = {
    "analyze": ("data", ("epoch", "previous")),
    "aggregate": ("results", ("epoch", "previous")),
    "converged": ("current", ("previous", "epoch")),
}


def _adapt(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    if not callable(function):
        raise AnalysisLoadError(f"{name} must be a function, got {type(function).__name__}")
    if getattr(function, "_flame_adapted", False):
        return function
    first, optional = _ALLOWED[name]
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return function
    params = list(signature.parameters.values())
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise AnalysisLoadError(f"{name}() must take its {first!r} as first argument")
    accepted = {p.name for p in params[1:]} & set(optional)
    keyword_only = [p for p in params if p.kind is p.KEYWORD_ONLY]
    for p in positional[1:] + keyword_only:
        if p.name not in optional and p.default is p.empty:
            raise AnalysisLoadError(
                f"{name}() has a required argument {p.name!r}; flame passes only "
                f"{first!r} and optionally {', '.join(map(repr, optional))}"
            )
    names = set(optional) if takes_kwargs else accepted

    def call(first_arg: Any, **kwargs: Any) -> Any:
        return function(first_arg, **{k: v for k, v in kwargs.items() if k in names})

    call.__name__ = getattr(function, "__name__", name)
    call.__wrapped__ = function  # type: ignore[attr-defined]
    call._flame_adapted = True  # type: ignore[attr-defined]
    return call


@dataclass(frozen=True)
class AnalysisFunctions:
    """analyze, aggregate and optional converged, adapted to flame's calling convention."""

    analyze: Callable[..., Any]
    aggregate: Callable[..., Any]
    converged: Callable[..., Any] | None = None

    @classmethod
    def of(
        cls,
        analyze: Callable[..., Any] | None,
        aggregate: Callable[..., Any] | None,
        converged: Callable[..., Any] | None = None,
    ) -> AnalysisFunctions:
        if analyze is None:
            raise AnalysisLoadError("no analyze function given")
        if aggregate is None:
            raise AnalysisLoadError("no aggregate function given")
        return cls(
            _adapt("analyze", analyze),
            _adapt("aggregate", aggregate),
            None if converged is None else _adapt("converged", converged),
        )

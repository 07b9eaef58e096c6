"""The run parameters an analysis reads as `flame.context().params`: a dict whose
missing-key error says how to pass the parameter (names only, never values)."""

from __future__ import annotations

from typing import Any, NoReturn

from flame.errors import ParamNotGiven
from flame.utils.hints import did_you_mean, name_list

__all__ = ["Params"]


class Params(dict[str, Any]):
    """`{name: value}`; `params["nope"]` raises `ParamNotGiven` (a KeyError) naming the fix."""

    def __missing__(self, key: object) -> NoReturn:
        name = str(key)[:64]
        hint = did_you_mean(name, self) if isinstance(key, str) else ""
        raise ParamNotGiven(
            key,
            f"run parameter {name!r} was not given{hint} (given: {name_list(self)}); pass it "
            f"with `flame simulate ... --param {name}=VALUE`, FLAME_PARAMS='{{\"{name}\": ...}}' "
            "on the nodes and the aggregator, or flame.simulate(..., config=flame.config."
            "load_config(params={...})); params.get(...) reads it with a default",
        )

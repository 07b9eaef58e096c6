"""Pydantic validation errors as one line per setting: the FLAME_* variable, what was wrong,
"did you mean" for a misspelt name, and never a secret's value."""

from __future__ import annotations

import re
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from flame.utils.hints import did_you_mean

ENV_PREFIX = "FLAME_"

_SECRET_FIELDS = {"token", "secret_key"}


_MODEL_ERROR = re.compile(r"^Value error, ([a-z_]+): (.*)$", re.DOTALL)


def _siblings(root: type[BaseModel], loc: list[str]) -> list[str]:
    """The setting names beside the one at `loc` (for "did you mean ...?")."""
    model: Any = root
    for part in loc[:-1]:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        nested = [
            t
            for t in (field.annotation, *typing.get_args(field.annotation))
            if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _describe(root: type[BaseModel], error: Any) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    message = str(error.get("msg", "invalid"))
    model_level = not loc
    if model_level:  # our cross-field checks say which field they are about
        found = _MODEL_ERROR.match(message)
        if found:
            loc, message = [found.group(1)], found.group(2)
    names = [p for p in loc if not p.isdigit()]
    variable = ENV_PREFIX + "__".join(p.upper() for p in loc) if loc else "config"
    key = ".".join(loc) if loc else "config"
    hide_input = model_level or error.get("type") in ("missing", "extra_forbidden")
    if error.get("type") == "extra_forbidden":
        name = loc[-1] if loc else ""
        message = "is not a known setting" + did_you_mean(name, _siblings(root, loc))
    shown = ""
    if "input" in error and not (set(names) & _SECRET_FIELDS) and not hide_input:
        text = repr(error["input"])
        shown = f" (got {text if len(text) <= 60 else text[:57] + '...'})"
    return f"{variable} / {key}: {message}{shown}"


def format_validation_error(exc: ValidationError, root: type[BaseModel]) -> str:
    """One line per wrong field, naming the variable and what was expected."""
    return "\n".join(_describe(root, err) for err in exc.errors())

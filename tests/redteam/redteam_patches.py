"""Malicious behaviour for one node process of an attack test (see sitecustomize.py).

Each patch replaces one function of flame in this process only; the other processes of the
run are the unchanged `flame run`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from importlib import import_module
from typing import Any


def _rebind(name: str, old: Any, new: Any) -> None:
    """Replace `old` by `new` wherever a flame module bound it under `name`."""
    for module in list(sys.modules.values()):
        if (
            getattr(module, "__name__", "").startswith("flame")
            and getattr(module, name, None) is old
        ):
            setattr(module, name, new)


def _hold() -> None:
    """The operator holds the other contributors' messages: here, their processes stop."""
    for pid in filter(None, os.environ.get("REDTEAM_HOLD", "").split(",")):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGSTOP)


def lying_reporter() -> None:
    """The reporter adds 100,000 to every decrypted sum it reports, after holding the
    confirmers (so nobody can contradict it before the deadline)."""
    import flame.node.runtime  # noqa: F401  (every module that binds answer_decrypt)

    fields = import_module("flame.secure.fields")  # `flame.secure` is also a function

    honest: Callable[..., dict[str, Any]] = fields.answer_decrypt

    def lying(*args: Any, **kwargs: Any) -> dict[str, Any]:
        reply = honest(*args, **kwargs)
        if isinstance(reply.get("sums"), dict):
            _hold()
            reply["sums"] = {path: value + 100_000 for path, value in reply["sums"].items()}
        return reply

    _rebind("answer_decrypt", honest, lying)


PATCHES: dict[str, Callable[[], None]] = {"lying_reporter": lying_reporter}


def apply(name: str) -> None:
    """Apply the patch, and say so on stderr (the test checks: a patch that silently failed
    would make the attack test pass against honest code)."""
    PATCHES[name]()
    print(f"REDTEAM patch applied: {name}", file=sys.stderr, flush=True)

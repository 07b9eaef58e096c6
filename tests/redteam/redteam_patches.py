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


def _summer_module() -> Any:
    """Where SecureSummer lives (secure/summer.py; main: secure/fields.py)."""
    try:
        return import_module("flame.secure.summer")
    except ImportError:
        return import_module("flame.secure.fields")


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

    name = "answer_vectors" if hasattr(fields, "answer_vectors") else "answer_decrypt"  # main
    honest: Callable[..., dict[str, Any]] = getattr(fields, name)

    def lying(*args: Any, **kwargs: Any) -> dict[str, Any]:
        reply = honest(*args, **kwargs)
        if isinstance(reply.get("sums"), dict):
            _hold()
            reply["sums"] = {path: value + 100_000 for path, value in reply["sums"].items()}
        return reply

    _rebind(name, honest, lying)


def aggregator_without_guard() -> None:
    """The aggregator lifts its own differencing guard (only its own settings change: the
    nodes keep FLAME_SECURE__ALLOW_CHANGING_CONTRIBUTORS off)."""
    fields = import_module("flame.secure.fields")
    original = fields.SecureKeys.from_settings.__func__

    def from_settings(cls: Any, settings: Any, *, role: str, node_id: Any = None) -> Any:
        keys = original(cls, settings, role=role, node_id=node_id)
        if role == "aggregation":
            keys.allow_changing_contributors = True
        return keys

    fields.SecureKeys.from_settings = classmethod(from_settings)


def relabelling_aggregator() -> None:
    """Before each honest secure sum: node-1's lone ciphertext, relabelled as a sum of
    node-0 and node-1, sent to node-0 to decrypt; what came back is written to REDTEAM_OUT."""
    fields = _summer_module()
    honest = fields.SecureSummer.__call__

    def call(self: Any, results: dict[str, Any], epoch: int) -> Any:
        _relabel(self, results, epoch)
        return honest(self, results, epoch)

    fields.SecureSummer.__call__ = call


def _relabel(summer: Any, results: dict[str, Any], epoch: int) -> None:
    import json
    from pathlib import Path

    from flame.protocols.paillier import EncryptedVector
    from flame.secure.contributions import unpack_contribution
    from flame.wire.envelope import Sealed

    victim = results["node-1"]["total"]
    data = bytes(victim.data)
    if victim.scheme != "paillier":  # a signed contribution: the vector after the signature
        _, data = unpack_contribution(data)
    vector = EncryptedVector.from_bytes(data, summer.keys.public_key)
    vector.contributors = 2
    relabelled = Sealed("paillier", vector.to_bytes())
    who = {"total": ["node-0", "node-1"]}
    attempts = {
        "sum": {"sums": {"total": relabelled}, "contributors": who, "reporter": "node-0"},
        "lone": {"contributions": {"total": {"node-1": victim}}, "contributors": who},
    }
    learned = {}
    for name, request in attempts.items():
        try:
            reply = summer._ask(epoch, ["node-0"], {"reporter": "node-0", **request})
            learned[name] = repr(reply["node-0"].get("sums"))
        except Exception as exc:
            learned[name] = f"refused: {exc}"
    Path(os.environ["REDTEAM_OUT"]).write_text(json.dumps(learned))


def withholding_aggregator() -> None:
    """The aggregator withholds every aggregate from node-1 (as if its policy said
    share_aggregate = false), though node-1's policy shares them."""
    from flame.aggregator.server import Aggregator

    honest = Aggregator._note_status

    def note(self: Any, *args: Any, **kwargs: Any) -> None:
        honest(self, *args, **kwargs)
        self._withheld.add("node-1")

    Aggregator._note_status = note  # type: ignore[method-assign]


def splitting_aggregator() -> None:
    """In epoch 0: the sum of node-1 and node-2 decrypted by node-1, then the sum of all three
    by node-0 (their difference: node-0's value), each with whatever the nodes require
    (endorsements where the code has them); what came back is written to REDTEAM_OUT."""
    fields = _summer_module()

    def call(self: Any, results: dict[str, Any], epoch: int) -> Any:
        import json
        from pathlib import Path

        from flame.errors import RunFailed

        learned = {
            "small": _try_sum(self, results, epoch, "node-1", ["node-1", "node-2"]),
            "big": _try_sum(self, results, epoch, "node-0", ["node-0", "node-1", "node-2"]),
        }
        Path(os.environ["REDTEAM_OUT"]).write_text(json.dumps(learned))
        raise RunFailed("red team: done")

    fields.SecureSummer.__call__ = call


def _try_sum(summer: Any, results: dict[str, Any], epoch: int, asked: str, who: list[str]) -> str:
    from flame.protocols.paillier import EncryptedVector
    from flame.wire.envelope import Sealed

    by_node = {node: results[node]["total"] for node in who}
    request: dict[str, Any] = {"contributors": {"total": who}, "reporter": asked}
    try:
        if all(item.scheme == "paillier" for item in by_node.values()):  # unsigned (main)
            vectors = [
                EncryptedVector.from_bytes(item.data, summer.keys.public_key)
                for item in by_node.values()
            ]
            total = EncryptedVector.sum(vectors).to_bytes()
            request["sums"] = {"total": Sealed("paillier", total)}
        else:
            request["contributions"] = {"total": by_node}
            if hasattr(summer, "_endorsements"):
                request["endorsements"] = summer._endorsements(
                    epoch, who, {"total": by_node}, {"total": who}
                )
        reply = summer._ask(epoch, [asked], request)[asked]
        return repr(reply.get("sums"))
    except Exception as exc:
        return f"refused: {exc}"


PATCHES: dict[str, Callable[[], None]] = {
    "splitting_aggregator": splitting_aggregator,
    "withholding_aggregator": withholding_aggregator,
    "lying_reporter": lying_reporter,
    "aggregator_without_guard": aggregator_without_guard,
    "relabelling_aggregator": relabelling_aggregator,
}


def apply(name: str) -> None:
    """Apply the patch, and say so on stderr (the test checks: a patch that silently failed
    would make the attack test pass against honest code)."""
    PATCHES[name]()
    print(f"REDTEAM patch applied: {name}", file=sys.stderr, flush=True)

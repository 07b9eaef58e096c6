"""Malicious behaviour for one process of tests/test_attacks_protocol_redteam.py.

Each patch replaces one function of flame in this process only; the other processes of the
run are the unchanged `flame run`. Whatever the attacker learned is written as JSON to
RT_PROTOCOL_OUT, so the test can assert on it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any


def _write(learned: dict[str, Any]) -> None:
    Path(os.environ["RT_PROTOCOL_OUT"]).write_text(json.dumps(learned))


def split_decrypters() -> None:
    """A malicious single-key aggregator (no private key) asks two different decrypters, in
    the same epoch and for the same field, for sums over two different contributor sets:
    node-0 for {node-0, node-1}, node-2 for {node-0, node-1, node-2}. Each decrypter sees one
    request that holds its own contribution as sent; the difference is node-2's value."""
    try:
        summer_class = import_module("flame.secure.summer").SecureSummer
    except ImportError:  # before cc33ac9
        summer_class = import_module("flame.secure.fields").SecureSummer
    honest = summer_class.__call__
    done: set[int] = set()

    def call(self: Any, results: dict[str, Any], epoch: int) -> Any:
        if epoch not in done:
            done.add(epoch)
            _split(self, results, epoch)
        return honest(self, results, epoch)

    summer_class.__call__ = call


def _split(summer: Any, results: dict[str, Any], epoch: int) -> None:
    signed = {node: result["total"] for node, result in results.items()}
    asks = {
        "node-0": ["node-0", "node-1"],
        "node-2": ["node-0", "node-1", "node-2"],
    }
    learned: dict[str, Any] = {}
    for decrypter, members in asks.items():
        contributions = {"total": {n: signed[n] for n in members}}
        request: dict[str, Any] = {
            "reporter": decrypter,
            "contributors": {"total": members},
            "contributions": contributions,
        }
        try:
            if hasattr(summer, "_endorsements"):  # since 3481dd5: the endorsement round too
                request["endorsements"] = summer._endorsements(
                    epoch, members, contributions, {"total": members}
                )
            reply = summer._ask(epoch, [decrypter], request)
            sums = reply[decrypter].get("sums") or {}
            import numpy as np

            total = sums.get("total")
            learned[decrypter] = (
                repr(sums) if total is None else [float(x) for x in np.asarray(total).ravel()]
            )
        except Exception as exc:
            learned[decrypter] = f"refused: {exc}"
    _write(learned)


def curious_decrypter() -> None:
    """node-0 follows the protocol to the letter, but decrypts, with the single private key
    it holds anyway, every other node's lone signed contribution that the aggregator's
    decryption request hands it (passive: its answers are the honest ones)."""
    single = import_module("flame.secure.single_key")
    honest = single.SingleKeyDecrypter.answer

    def answer(self: Any, envelope: Any) -> dict[str, Any]:
        from flame.protocols.paillier import EncryptedVector, decrypt_vector
        from flame.secure.contributions import unpack_contribution

        learned: dict[str, Any] = {}
        path_ = Path(os.environ["RT_PROTOCOL_OUT"])
        if path_.exists():
            learned = json.loads(path_.read_text())
        body = envelope.body if isinstance(envelope.body, dict) else {}
        for path, by_node in (body.get("contributions") or {}).items():
            for node, sealed in by_node.items():
                if node == self.node_id:
                    continue
                try:
                    _, data = unpack_contribution(bytes(sealed.data))
                    vector = EncryptedVector.from_bytes(data, self.keys.public_key)
                    spec = self._specs.get(path, self.keys.spec)
                    plain = decrypt_vector(vector, self.keys.private_key, spec, min_contributors=1)
                    learned[f"{node}/{path}"] = [float(x) for x in plain.ravel()]
                except Exception as exc:
                    learned[f"{node}/{path}"] = f"failed: {type(exc).__name__}: {exc}"
        _write(learned)
        return honest(self, envelope)

    single.SingleKeyDecrypter.answer = answer


def equivocating_aggregator() -> None:
    """The aggregator sends node-1 other aggregates and another final result than everyone
    else (equivocation): node-1 computes its next epoch on a made-up `previous`."""
    from flame.aggregator.server import Aggregator

    honest = Aggregator._envelope

    def envelope(self: Any, node: str, kind: Any, epoch: int, body: Any) -> Any:
        if node == "node-1" and kind in ("aggregate", "finished") and isinstance(body, dict):
            body = {**body, "value": {"total": 1_000_000.0}}
        return honest(self, node, kind, epoch, body)

    Aggregator._envelope = envelope  # type: ignore[method-assign]


PATCHES: dict[str, Callable[[], None]] = {
    "equivocating_aggregator": equivocating_aggregator,
    "split_decrypters": split_decrypters,
    "curious_decrypter": curious_decrypter,
}


def apply(name: str) -> None:
    """Apply the patch, and say so on stderr (the test checks it, so a patch that silently
    failed cannot make an attack test pass against honest code)."""
    PATCHES[name]()
    print(f"RT_PROTOCOL patch applied: {name}", file=sys.stderr, flush=True)

"""The differencing guard of a masking node, kept in its node-local state across restarts.

Under masking the aggregator chooses which masked inputs a sum holds (the survivor set U3),
so the nodes stop differencing: the first set a node signs, of any field, fixes the
contributor set of the analysis (later sets must equal it, unless
FLAME_SECURE__ALLOW_CHANGING_CONTRIBUTORS), and a node signs at most one set per (epoch,
field), whatever the setting. The ledger is written to the node's state (`NodeState`: a local
folder or the node's bucket) before the signature leaves the node, and read back before the
first decision, so a restarted node still refuses. With a roster identity it is
authenticated (HMAC-SHA256 under a key derived from a deterministic Ed25519 signature that
never leaves the node): a changed or foreign ledger makes the node refuse to sign.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from typing import TYPE_CHECKING, Any

from flame.protocols.masking.errors import ProtocolViolation

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from flame.secure.guard import NodeLocalState

__all__ = ["TAG", "MaskingGuard"]

TAG = "flame-masking-guard"


class MaskingGuard:
    """Which survivor sets this node has signed, and the set they fix."""

    def __init__(
        self,
        analysis_id: str,
        node_id: str,
        *,
        state: NodeLocalState | None,
        identity: Ed25519PrivateKey | None,
        allow_changing: bool,
    ) -> None:
        self.allow_changing = allow_changing
        self._state = state
        self._key = None
        if identity is not None:
            label = f"flame-masking-guard-key-v1\0{analysis_id}\0{node_id}".encode()
            self._key = hashlib.sha256(identity.sign(label)).digest()
        self._fixed: tuple[str, ...] | None = None
        self._signed: dict[tuple[int, str], tuple[str, ...]] = {}
        self._loaded = False
        self._lock = threading.Lock()

    def check(self, epoch: int, path: str, u3: object) -> tuple[str, ...]:
        """The survivor set asked for, unless signing it could let sums be differenced."""
        if not isinstance(u3, list) or not all(isinstance(v, str) for v in u3):
            raise ProtocolViolation("survivors: malformed survivor set")
        chosen = tuple(u3)
        with self._lock:
            self._load()
            before = self._signed.get((epoch, path))
            fixed = self._fixed
        if before is not None and before != chosen:
            raise ProtocolViolation(
                f"already signed another contributor set for {path!r} in epoch {epoch}; "
                "a second sum could reveal a difference"
            )
        if fixed is not None and chosen != fixed and not self.allow_changing:
            missing = sorted(set(fixed) - set(chosen))
            new = sorted(set(chosen) - set(fixed))
            raise ProtocolViolation(
                f"the contributor set of this analysis is fixed by its first masked sum; "
                f"{path!r} in epoch {epoch} would leave out {missing} and add {new}, so "
                "sums could be differenced (FLAME_SECURE__ALLOW_CHANGING_CONTRIBUTORS "
                "lifts this)"
            )
        return chosen

    def record(self, epoch: int, path: str, chosen: tuple[str, ...]) -> None:
        """Keep a set this node is about to sign (saved first: a failed save refuses)."""
        with self._lock:
            self._load()
            self._signed[(epoch, path)] = chosen
            if self._fixed is None:
                self._fixed = chosen
            self._save()

    def _body(self) -> dict[str, Any]:
        signed = [[e, p, list(s)] for (e, p), s in sorted(self._signed.items())]
        return {"fixed": None if self._fixed is None else list(self._fixed), "signed": signed}

    def _mac(self, body: dict[str, Any]) -> str:
        if self._key is None:
            return ""
        text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self._key, text, hashlib.sha256).hexdigest()

    def _save(self) -> None:
        if self._state is None:
            return
        body = self._body()
        try:
            self._state.save(TAG, {**body, "mac": self._mac(body)})
        except Exception as exc:  # storage errors of any client: refuse, never sign unguarded
            raise ProtocolViolation(
                f"cannot write the masking guard ledger ({type(exc).__name__}); not signing"
            ) from None

    def _load(self) -> None:
        if self._loaded or self._state is None:
            self._loaded = True
            return
        try:
            saved = self._state.load(TAG, None)
        except Exception as exc:
            raise ProtocolViolation(
                f"cannot read the masking guard ledger ({type(exc).__name__}); not signing"
            ) from None
        if saved is not None:
            self._restore(saved)
        self._loaded = True

    def _restore(self, saved: object) -> None:
        bad = ProtocolViolation(
            "the masking guard ledger in this node's state is changed, foreign or corrupt; "
            "not signing (it is never reset silently: delete it only if you know why)"
        )
        if not isinstance(saved, dict) or set(saved) != {"fixed", "signed", "mac"}:
            raise bad
        body = {"fixed": saved["fixed"], "signed": saved["signed"]}
        if not hmac.compare_digest(str(saved["mac"]), self._mac(body)):
            raise bad
        fixed, signed = body["fixed"], body["signed"]
        try:
            self._fixed = None if fixed is None else tuple(str(v) for v in fixed)
            for epoch, path, nodes in signed:
                self._signed[(int(epoch), str(path))] = tuple(str(v) for v in nodes)
        except (TypeError, ValueError):
            raise bad from None

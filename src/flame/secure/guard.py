"""A share holder's differencing-guard ledger, kept in node-local state across restarts.

The guard (a field's contributor set is fixed by its first endorsed or decrypted sum; one
endorsed set and one sum per analysis, epoch and field) only protects a node's values if a
restarted share holder still knows what it endorsed and decrypted: otherwise the aggregator
restarts it and asks for the differing sum. The ledger is written to the node's own state
(`NodeState.reserved()`: `nodes/{node}/runtime/`, beside the analyst's `state/` and out of
reach of `context().save/load`, which refuse `flame-` tags; a local folder or the node's
bucket, written atomically) *before* an
endorsement or a partial decryption is released, and read back before the first decision.
It is authenticated with a key derived from the holder's secret share, so a changed,
foreign or corrupt ledger makes the holder refuse to endorse or decrypt with a clear error;
it is never silently reset. (Deleting the ledger cannot be detected here: protect the
node's storage like its share file.)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import TYPE_CHECKING, Any, Protocol

from flame.errors import FlameError

if TYPE_CHECKING:
    from flame.protocols.paillier.threshold import ThresholdKeyShare

__all__ = ["TAG", "GuardLedger", "LedgerError", "NodeLocalState"]

log = logging.getLogger(__name__)

TAG = "flame-threshold-guard"
"""The node-state tag the ledger is stored under."""
_VERSION = 1


class LedgerError(FlameError):
    """The ledger is unreadable, changed or cannot be written: the holder will not decrypt."""


class NodeLocalState(Protocol):
    """`NodeState` / `MemoryState`: where a node keeps values that survive a restart."""

    def save(self, tag: str, value: Any) -> None: ...

    def load(self, tag: str, default: Any = None) -> Any: ...


def _mac_key(share: ThresholdKeyShare) -> bytes:
    secret = int(share.secret)
    raw = secret.to_bytes((secret.bit_length() + 7) // 8 or 1, "big")
    h = hashlib.sha256(b"flame-threshold-guard-key-v1\0")
    h.update(f"{share.node_id}\0{share.index}\0".encode())
    h.update(raw)
    return h.digest()


class GuardLedger:
    """Fixed contributor sets, endorsed sets and decrypted-sum digests of one share holder
    (not thread-safe: `ThresholdParty` holds its lock around every use)."""

    def __init__(
        self, share: ThresholdKeyShare | None, state: NodeLocalState | None, **parts: Any
    ) -> None:
        if share is not None:
            parts = {"node": share.node_id, "index": share.index, "key": _mac_key(share)}
        reserved = getattr(state, "reserved", None)  # NodeState/MemoryState: the runtime's part
        self._legacy = state if callable(reserved) else None
        self._state = reserved() if callable(reserved) else state
        self._node: str = parts["node"]
        self._index: int = parts["index"]
        self._key: bytes = parts["key"]
        self._tag: str = parts.get("tag", TAG)
        self._name = "threshold guard ledger" if self._tag == TAG else "single-key guard ledger"
        self._fixed: dict[str, dict[str, list[str]]] = {}
        self._answered: dict[str, dict[str, str]] = {}
        self._endorsed: dict[str, dict[str, str]] = {}
        self._loaded = state is None

    @classmethod
    def for_secret(
        cls, node: str, secret: int, state: NodeLocalState | None, tag: str
    ) -> GuardLedger:
        """A ledger authenticated with a key derived from `secret` (single-key mode: from
        the private key), stored under `tag`."""
        raw = secret.to_bytes((secret.bit_length() + 7) // 8 or 1, "big")
        h = hashlib.sha256(f"{tag}-key-v1\0{node}\0".encode())
        h.update(raw)
        return cls(None, state, node=node, index=0, key=h.digest(), tag=tag)

    # -- queries ----------------------------------------------------------------------------

    def fixed(self, analysis: str, path: str) -> tuple[str, ...] | None:
        self._load()
        who = self._fixed.get(analysis, {}).get(path)
        return None if who is None else tuple(who)

    def fixed_sets(self, analysis: str) -> dict[str, tuple[str, ...]]:
        """Every field's fixed contributor set in `analysis` (the guard spans fields)."""
        self._load()
        return {path: tuple(who) for path, who in self._fixed.get(analysis, {}).items()}

    def answered(self, analysis: str, epoch: int, path: str) -> bytes | None:
        """SHA-256 of the sum this holder decrypted for (analysis, epoch, field), or None."""
        self._load()
        digest = self._answered.get(analysis, {}).get(f"{epoch}/{path}")
        return None if digest is None else bytes.fromhex(digest)

    def endorsed(self, analysis: str, epoch: int, path: str) -> bytes | None:
        """The digest of the contribution set this holder endorsed for (analysis, epoch,
        field), or None."""
        self._load()
        digest = self._endorsed.get(analysis, {}).get(f"{epoch}/{path}")
        return None if digest is None else bytes.fromhex(digest)

    # -- updates ----------------------------------------------------------------------------

    def record(
        self,
        analysis: str,
        epoch: int,
        path: str,
        who: tuple[str, ...],
        digest: bytes,
        endorsed: bytes | None = None,
    ) -> None:
        """Remember a decryption (and, if this holder endorsed no set for it, its set as the
        one set it will endorse); persisted before returning (LedgerError if it cannot be)."""
        self._load()
        fixed = self._fixed.setdefault(analysis, {})
        answered = self._answered.setdefault(analysis, {})
        sets = self._endorsed.setdefault(analysis, {})
        key = f"{epoch}/{path}"
        added_fixed = path not in fixed
        if added_fixed:
            fixed[path] = list(who)
        added_set = endorsed is not None and key not in sets
        if endorsed is not None and added_set:
            sets[key] = endorsed.hex()
        answered[key] = digest.hex()
        try:
            self._save()
        except Exception:
            del answered[key]
            if added_fixed:
                del fixed[path]
            if added_set:
                del sets[key]
            raise

    def endorse(
        self, analysis: str, epoch: int, path: str, who: tuple[str, ...], digest: bytes
    ) -> None:
        """Remember an endorsement (it also fixes the field's contributor set if this is its
        first); persisted before returning (LedgerError if it cannot be)."""
        self._load()
        fixed = self._fixed.setdefault(analysis, {})
        endorsed = self._endorsed.setdefault(analysis, {})
        key = f"{epoch}/{path}"
        added_fixed = path not in fixed
        if added_fixed:
            fixed[path] = list(who)
        endorsed[key] = digest.hex()
        try:
            self._save("endorse")
        except Exception:
            del endorsed[key]
            if added_fixed:
                del fixed[path]
            raise

    # -- storage ----------------------------------------------------------------------------

    def _body(self) -> str:
        return json.dumps(
            {
                "version": _VERSION,
                "node": self._node,
                "index": self._index,
                "fixed": self._fixed,
                "answered": self._answered,
                "endorsed": self._endorsed,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()

    def _save(self, what: str = "decrypt") -> None:
        if self._state is None:
            return
        body = self._body()
        try:
            self._state.save(self._tag, {"body": body, "mac": self._mac(body)})
        except Exception as exc:
            noun = "decryption" if what == "decrypt" else "endorsement"
            raise LedgerError(
                f"refusing to {what}: could not record the {noun} in this node's "
                f"{self._name} ({type(exc).__name__}: {exc})"
            ) from None

    def _load(self) -> None:
        if self._loaded or self._state is None:
            return
        if getattr(self._state, "forgotten_on_restart", False):  # MemoryState outside simulate
            log.warning(  # README: a restarted holder without it can be asked for a second set
                "no node storage (FLAME_STORAGE__RESULTS_DIR or a bucket): this key holder's "
                "differencing guard is kept in memory only and forgotten on a restart"
            )
        where = f"this node's {self._name} (node state {self._tag!r})"
        try:
            stored = self._state.load(self._tag, None)
            if stored is None and self._legacy is not None:  # written before it moved here
                stored = self._legacy.load(self._tag, None)
        except Exception as exc:
            raise LedgerError(
                f"refusing to endorse or decrypt: {where} is unreadable "
                f"({type(exc).__name__}: {exc}); it is not reset: restore it, or start over "
                "under a new analysis id"
            ) from None
        if stored is not None:
            self._accept(stored, where)
        self._loaded = True

    def _accept(self, stored: Any, where: str) -> None:
        refuse = (
            f"refusing to endorse or decrypt: {where} was changed, is corrupt or belongs to "
            "another share; it is not reset: restore it, or start over under a new analysis id"
        )
        if not isinstance(stored, dict):
            raise LedgerError(refuse)
        body, mac = stored.get("body"), stored.get("mac")
        if not isinstance(body, str) or not isinstance(mac, str):
            raise LedgerError(refuse)
        if not hmac.compare_digest(self._mac(body), mac):
            raise LedgerError(refuse)
        try:
            data = json.loads(body)
        except ValueError:
            raise LedgerError(refuse) from None
        if (
            not isinstance(data, dict)
            or data.get("version") != _VERSION
            or data.get("node") != self._node
            or data.get("index") != self._index
            or not isinstance(data.get("fixed"), dict)
            or not isinstance(data.get("answered"), dict)
            or not isinstance(data.get("endorsed", {}), dict)
        ):
            raise LedgerError(refuse)
        self._fixed = data["fixed"]
        self._answered = data["answered"]
        self._endorsed = data.get("endorsed", {})  # absent in ledgers written before it

"""The keys and encoding of a node's Paillier secure sums (single key or threshold), read
from the settings, and the obfuscators a node makes ahead while it waits for an epoch."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flame.config import SecureAggregationSettings
from flame.errors import ConfigError

if TYPE_CHECKING:
    from phe.paillier import PaillierPrivateKey, PaillierPublicKey

    from flame.protocols.paillier.threshold import ThresholdKeyShare, ThresholdPublicKey
    from flame.secure.contributions import Signer, Verifier
    from flame.secure.marked import Secure
    from flame.secure.threshold import ThresholdParty

__all__ = ["Precomputer", "SecureKeys"]

log = logging.getLogger(__name__)


@dataclass
class SecureKeys:
    """Keys and encoding of one node; the aggregator's never has a private key."""

    public_key: PaillierPublicKey
    private_key: PaillierPrivateKey | None
    spec: Any
    min_contributors: int
    obfuscation: str = "standard"
    confirm_fraction: float | None = None
    threshold: ThresholdPublicKey | None = None
    """Threshold mode: no node holds the private key; any T share holders decrypt."""
    share: ThresholdKeyShare | None = None
    signer: Signer | None = None
    verifier: Verifier | None = None
    allow_changing_contributors: bool = False
    shares: dict[str, ThresholdKeyShare] | None = None
    """Simulation only: every node's share, handed out by `for_node`."""
    _party: ThresholdParty | None = None
    precompute: int = 0
    """Public-key encryption: obfuscators to make ahead while waiting for the first epoch."""
    used_ciphertexts: int = 0
    decrypters: int | None = None

    @classmethod
    def from_settings(
        cls, settings: SecureAggregationSettings, *, role: str, node_id: str | None = None
    ) -> SecureKeys:
        from flame.protocols import paillier

        if settings.key_share_file is not None or _is_threshold(settings.public_key_file):
            return cls._threshold_from_settings(settings, role=role, node_id=node_id)
        if role == "aggregation" and settings.private_key_file is not None:
            raise ConfigError(
                "FLAME_SECURE__PRIVATE_KEY_FILE / secure.private_key_file: the aggregation "
                "node must not hold the private key; configure only the public key for it"
            )
        if role == "analysis" and settings.private_key_file is None:
            raise ConfigError(
                "FLAME_SECURE__PRIVATE_KEY_FILE / secure.private_key_file: required on "
                "analysis nodes when secure aggregation is enabled"
            )
        private = None
        if settings.private_key_file is not None:
            private = paillier.load_private_key(Path(settings.private_key_file))
            public = private.public_key
        elif settings.public_key_file is not None:
            public = paillier.load_public_key(Path(settings.public_key_file))
        else:
            raise ConfigError(
                "FLAME_SECURE__PUBLIC_KEY_FILE / secure.public_key_file: required when "
                "secure aggregation is enabled (make keys with `flame keys generate`)"
            )
        return cls(
            public,
            private,
            cls.spec_of(settings),
            settings.min_contributors,
            settings.obfuscation,
            allow_changing_contributors=settings.allow_changing_contributors,
        )

    @classmethod
    def _threshold_from_settings(
        cls, settings: SecureAggregationSettings, *, role: str, node_id: str | None
    ) -> SecureKeys:
        from flame.protocols.paillier.threshold_files import (
            load_key_share,
            load_threshold_public_key,
        )

        if settings.private_key_file is not None:
            raise ConfigError(
                "FLAME_SECURE__PRIVATE_KEY_FILE / secure.private_key_file: not used with a "
                "threshold key (no node holds the private key); give this node its "
                "FLAME_SECURE__KEY_SHARE_FILE instead"
            )
        share = None
        if role == "aggregation":
            if settings.key_share_file is not None:
                raise ConfigError(
                    "FLAME_SECURE__KEY_SHARE_FILE / secure.key_share_file: the aggregation "
                    "node must not hold a key share"
                )
            assert settings.public_key_file is not None
            public = load_threshold_public_key(Path(settings.public_key_file))
        else:
            if settings.key_share_file is None:
                raise ConfigError(
                    "FLAME_SECURE__KEY_SHARE_FILE / secure.key_share_file: required on analysis "
                    "nodes with a threshold key (share-<node>.json from `flame keys generate "
                    "--threshold`)"
                )
            share = load_key_share(Path(settings.key_share_file), node_id=node_id)
            public = share.public
            if settings.public_key_file is not None:
                given = load_threshold_public_key(Path(settings.public_key_file))
                if given != public:
                    raise ConfigError(
                        "FLAME_SECURE__PUBLIC_KEY_FILE and FLAME_SECURE__KEY_SHARE_FILE belong "
                        "to different threshold keys"
                    )
        return cls(
            public.paillier,
            None,
            cls.spec_of(settings),
            settings.min_contributors,
            settings.obfuscation,
            threshold=public,
            share=share,
            allow_changing_contributors=settings.allow_changing_contributors,
            precompute=settings.precompute,
            decrypters=settings.decrypters,
        )

    def for_node(self, node_id: str) -> SecureKeys:
        """This node's keys: in a threshold simulation, with its own share and ledger."""
        if self.shares is None:
            return self
        return replace(self, share=self.shares[node_id], shares=None, _party=None)

    def party(self, state: Any = None) -> ThresholdParty:
        """The share holder's decision-maker (one per node: it remembers what it decrypted,
        in `state`, the node-local state, so that a restart does not forget it)."""
        from flame.secure.threshold import ThresholdParty

        assert self.share is not None
        if self._party is None:
            self._party = ThresholdParty(
                self.share,
                self.verifier,
                self.min_contributors,
                self.allow_changing_contributors,
                state=state,
                sign=self.signer,
            )
        return self._party

    @staticmethod
    def spec_of(settings: SecureAggregationSettings) -> Any:
        from flame.protocols.paillier import SecureSumSpec

        return SecureSumSpec(settings.precision, settings.bound, settings.max_nodes)

    def spec_for(self, marker: Secure) -> Any:
        """The encoding of one marked field: the configured spec with its own overrides."""
        if marker.bound is None and marker.precision is None:
            return self.spec
        return self.spec.with_overrides(bound=marker.bound, precision=marker.precision)

    def public_only(self) -> SecureKeys:
        return SecureKeys(
            self.public_key,
            None,
            self.spec,
            self.min_contributors,
            self.obfuscation,
            threshold=self.threshold,
            verifier=self.verifier,
            allow_changing_contributors=self.allow_changing_contributors,
            decrypters=self.decrypters,
        )


class Precomputer:
    """Makes encryption obfuscators (r^n, or h^a with DJN) in a background thread while the
    node waits, so that encrypting with the public key alone costs about one multiplication
    per ciphertext when the epoch starts. Each obfuscator is used once."""

    def __init__(self, keys: SecureKeys) -> None:
        from flame.protocols.paillier.cipher import _encryptor_for

        self._encryptor = _encryptor_for(keys.public_key, keys.obfuscation, None)  # type: ignore[arg-type]
        self._opened = keys.threshold is not None  # threshold mode proves plaintext knowledge
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> int:
        if self._opened:
            return self._encryptor.precomputed_opened
        return self._encryptor.precomputed

    def fill(self, target: int) -> None:
        """Start making obfuscators until `target` are ready (returns at once)."""
        if target <= self.ready or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(target,), name="flame-precompute", daemon=True
        )
        self._thread.start()

    def _run(self, target: int) -> None:
        started = time.perf_counter()
        while not self._stop.is_set() and self.ready < target:
            self._encryptor.precompute(min(64, target - self.ready), opened=self._opened)
        log.info(
            "precomputed %d encryption obfuscators in %.1f s",
            self.ready,
            time.perf_counter() - started,
        )

    def stop(self) -> None:
        self._stop.set()


def _is_threshold(path: Path | None) -> bool:
    """Whether a public key file is a threshold key (it has a "threshold" part); a file
    that cannot be read is left to the loader, which names the problem."""
    if path is None:
        return False
    try:
        with Path(path).open("rb") as fh:
            data = json.loads(fh.read(1 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "threshold" in data

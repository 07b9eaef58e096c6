"""Secure sums inside a run: the aggregator adds what it cannot read.

The analyst marks values with `flame.secure(x)` in what `analyze` returns. Analysis nodes
encrypt them (Paillier, packed) before sending; the aggregator, holding only the public key,
adds the ciphertexts of each marked field over the nodes that answered, and sends the
encrypted sums back: one node (the reporter) decrypts and reports the plaintext sums, then
every other contributor checks that report against the ciphertexts (all of them, or a random
sample: `confirm_fraction`). A mismatch or a refusal stops the run. `aggregate` then sees
`results.secure[field]` (the sum) and `results.contributors[field]` (whose values it holds).
This module: markers, keys, sealing and the nodes' decryption; the aggregator's side is
`flame.secure.summer`, single-key decrypters' checks `flame.secure.single_key`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flame.config import SecureAggregationSettings
from flame.errors import ConfigError, FlameError
from flame.privacy.markers import register
from flame.wire.envelope import Envelope, Sealed

if TYPE_CHECKING:
    from phe.paillier import PaillierPrivateKey, PaillierPublicKey

    from flame.protocols.paillier import EncryptedVector
    from flame.protocols.paillier.plaintext_proof import Opening
    from flame.protocols.paillier.threshold import ThresholdKeyShare, ThresholdPublicKey
    from flame.secure.contributions import Signer, Verifier
    from flame.secure.threshold import ThresholdParty

__all__ = ["Results", "Secure", "SecureKeys", "secure"]

log = logging.getLogger(__name__)

SCHEME = "paillier"
DECRYPT = "flame.secure.decrypt"
DECRYPTED = "flame.secure.decrypted"


@register("secure")
@dataclass(frozen=True)
class Secure:
    """A value `analyze` wants summed under encryption (see `flame.secure`)."""

    values: Any
    bound: float | None = None
    precision: int | None = None


def secure(values: Any, *, bound: float | None = None, precision: int | None = None) -> Secure:
    """Mark numbers (a scalar, list or numpy array) to be summed without the aggregator
    seeing them: `return {"n": n, "total": flame.secure(x.sum(axis=0))}`.

    `bound` (largest |value|) and `precision` (fractional bits) override the configured
    defaults (FLAME_SECURE__BOUND, FLAME_SECURE__PRECISION) for this field only, so one
    large-magnitude field neither fails at the global bound nor widens every other field's
    slots: `flame.secure((age**2).sum(), bound=1e7)`. With `precision=0` the values are
    summed as exact integers and come back as ints. A scalar comes back as a Python
    float (int with `precision=0`) in `results.secure[...]`, an array as a numpy array.
    Every node must mark a field the same way.
    """
    if bound is not None and (
        isinstance(bound, bool)
        or not isinstance(bound, (int, float, np.integer, np.floating))
        or not (np.isfinite(bound) and bound > 0)
    ):
        raise FlameError(f"flame.secure(bound={bound!r}): the bound must be a positive number")
    if precision is not None and (
        isinstance(precision, bool)
        or not isinstance(precision, (int, np.integer))
        or not 0 <= precision <= 60
    ):
        raise FlameError(
            f"flame.secure(precision={precision!r}): the precision is a number of fractional "
            "bits, an int from 0 to 60"
        )
    return Secure(
        values,
        None if bound is None else float(bound),
        None if precision is None else int(precision),
    )


class Summed:
    """Stands in `results[node][field]` for a securely summed field: only the sum exists."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"<securely summed: see results.secure[{self.path!r}]>"


class Results(dict[str, Any]):
    """`{node id: result}` for `aggregate`, plus the securely summed fields."""

    def __init__(
        self,
        results: dict[str, Any],
        secure: dict[str, Any] | None = None,
        contributors: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__(results)
        self.secure: dict[str, Any] = dict(secure or {})
        self.contributors: dict[str, list[str]] = dict(contributors or {})


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


# --- walking result trees --------------------------------------------------------------------


def _walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")


def _replace(value: Any, change: Any, path: str = "") -> Any:
    replaced = change(path, value)
    if replaced is not value:
        return replaced
    if isinstance(value, dict):
        return {k: _replace(v, change, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace(v, change, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


# --- the analysis node's side ----------------------------------------------------------------


def seal(
    result: Any,
    keys: SecureKeys | None,
    specs: dict[str, Any] | None = None,
    origin: tuple[str, int, str] | None = None,
) -> Any:
    """Encrypt every `flame.secure(...)` in a result (errors name the field and index).

    `specs` (if given) receives the encoding used for each field path: the node checks a
    decryption request against it, so the sums are read at the precision it sent.
    """

    def change(path: str, value: Any) -> Any:
        if not isinstance(value, Secure):
            return value
        field = path or "value"
        if keys is None:
            raise FlameError(
                f"analyze returned flame.secure(...) at {path or 'the top'!r}, but secure "
                "aggregation is not enabled (FLAME_SECURE__ENABLED=true, or --secure)"
            )
        from flame.protocols.paillier import (
            SecureAggregationError,
            ValueOutOfBoundsError,
            encrypt_vector,
        )

        try:
            spec = keys.spec_for(value)
        except SecureAggregationError as exc:
            raise FlameError(f"flame.secure(...) at {field!r}: {exc}") from None
        key = keys.private_key if keys.private_key is not None else keys.public_key
        opening = None
        try:
            if keys.threshold is not None:  # with the opening its proof of knowledge needs
                from flame.protocols.paillier.cipher import _encryptor_for

                encryptor = _encryptor_for(key, keys.obfuscation, None)  # type: ignore[arg-type]
                encrypted, opening = encryptor.encrypt_opened(value.values, spec, field=field)
            else:
                encrypted = encrypt_vector(
                    value.values,
                    key,
                    spec,
                    field=field,
                    obfuscation=keys.obfuscation,  # type: ignore[arg-type]
                )
        except ValueOutOfBoundsError as exc:
            if "bound" not in str(exc):
                raise
            raise ValueOutOfBoundsError(
                f"{exc}. The bound in force for {field!r} is +-{spec.bound:g} "
                f"({_bound_origin(value)}); raise it for this field with "
                f"flame.secure(value, bound=...) in analyze, or for every field with "
                f"FLAME_SECURE__BOUND (secure.bound in a config file)",
                field=exc.field,
                index=exc.index,
            ) from None
        if specs is not None:
            specs[path] = spec
        keys.used_ciphertexts += len(encrypted.ciphertexts)
        if keys.threshold is not None:
            assert opening is not None
            return _signed(encrypted, opening, keys, path, origin)
        if keys.signer is not None and origin is not None:  # decrypters re-add signed ones
            from flame.secure.single_key import sign_contribution

            return sign_contribution(encrypted.to_bytes(), keys.signer, path, origin)
        return Sealed(SCHEME, encrypted.to_bytes())

    return _replace(result, change)


def _signed(
    encrypted: EncryptedVector,
    opening: Opening,
    keys: SecureKeys,
    path: str,
    origin: tuple[str, int, str] | None,
) -> Sealed:
    """A threshold contribution: the vector, the proof that this node knows its plaintexts,
    and this node's signature over both and where they belong."""
    from flame.secure.contributions import (
        CONTRIBUTION,
        contribution_message,
        pack_contribution,
        prove_contribution,
    )

    assert keys.threshold is not None
    if origin is None:
        raise FlameError("a threshold contribution needs the analysis, epoch and node id")
    analysis, epoch, node = origin
    body = prove_contribution(keys.threshold, analysis, epoch, path, node, encrypted, opening)
    signature = b""
    if keys.signer is not None:
        signature = keys.signer(contribution_message(analysis, epoch, path, node, body))
    return Sealed(CONTRIBUTION, pack_contribution(signature, body))


def _spec_hint(exc: Exception) -> str:
    if "SecureSumSpec" not in str(exc):
        return ""
    return (
        " (the nodes encoded it differently: every node must mark it with "
        "the same flame.secure(..., bound=, precision=) and FLAME_SECURE__*)"
    )


def _bound_origin(marker: Secure) -> str:
    if marker.bound is not None:
        return f"set by flame.secure(..., bound={marker.bound:g})"
    return "the configured default, FLAME_SECURE__BOUND"


def _as_floats(sums: np.ndarray) -> np.ndarray:
    if sums.dtype == object:
        return np.array([float(s) for s in sums], dtype=np.float64)
    return sums.astype(np.float64)


def _plain(value: np.ndarray, precision: int) -> Any:
    """A decrypted sum as the analyst wants it: a scalar as a Python number, integers
    (precision 0) as ints."""
    if precision == 0:
        value = np.rint(value).astype(np.int64)
    return value.item() if value.ndim == 0 else value


def answer_decrypt(
    envelope: Envelope,
    keys: SecureKeys,
    node_id: str,
    specs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Unsigned runs only (signed ones: `flame.secure.single_key`): decrypt the aggregator's
    encrypted sums (as the reporter), or check the reporter's plaintext against them (as a
    confirmer); refuse sums of too few contributors.

    `specs` are the encodings this node used per field when it sealed its result (see
    `seal`); fields not in it are read with the configured spec."""
    from flame.protocols.paillier import EncryptedVector

    body = envelope.body if isinstance(envelope.body, dict) else {}
    sums = body.get("sums")
    contributors = body.get("contributors")
    if not isinstance(sums, dict) or not isinstance(contributors, dict):
        return {"error": "malformed decryption request"}
    vectors: dict[str, EncryptedVector] = {}
    try:
        for path, sealed in sums.items():
            who = contributors.get(path)
            if not isinstance(sealed, Sealed) or not isinstance(who, list):
                return {"error": f"malformed decryption request for {path!r}"}
            if node_id not in who:
                return {"error": f"asked to decrypt {path!r}, to which this node did not add"}
            vector = EncryptedVector.from_bytes(sealed.data, keys.public_key)
            if vector.contributors != len(who):
                return {
                    "error": f"{path!r} holds {vector.contributors} contributions, "
                    f"the request names {len(who)}"
                }
            vectors[path] = vector
    except FlameError as exc:
        return {"error": str(exc)}
    return answer_vectors(body, vectors, keys, specs)


def answer_vectors(
    body: dict[str, Any],
    vectors: dict[str, EncryptedVector],
    keys: SecureKeys,
    specs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The reporter's decrypted sums of `vectors` ({"sums": ...}), or a confirmer's check of
    the reported ones in `body` ({"confirmed": n}); {"error": why} otherwise."""
    from flame.protocols.paillier import decrypt_vector, verify_reported_sum

    assert keys.private_key is not None
    reported = body.get("reported")
    fraction = body.get("fraction", 1.0)
    if reported is not None and not isinstance(reported, dict):
        return {"error": "malformed decryption request (reported sums)"}
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        return {"error": "malformed decryption request (fraction)"}
    plain: dict[str, np.ndarray] = {}
    checked = 0
    try:
        for path, vector in vectors.items():
            spec = (specs or {}).get(path, keys.spec)
            if reported is None:
                plain[path] = decrypt_vector(
                    vector, keys.private_key, spec, min_contributors=keys.min_contributors
                )
            else:
                checked += verify_reported_sum(
                    vector,
                    keys.private_key,
                    spec,
                    reported.get(path),
                    min_contributors=keys.min_contributors,
                    fraction=float(fraction),
                )
    except FlameError as exc:
        return {"error": str(exc)}
    if reported is None:
        return {"sums": plain}
    return {"confirmed": checked}

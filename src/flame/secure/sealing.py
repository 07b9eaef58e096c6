"""The analysis node's side of Paillier secure sums: every `flame.secure(...)` in a result
encrypted (single key: optionally signed; threshold: with its proof of plaintext knowledge)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flame.errors import FlameError
from flame.secure.marked import Secure, _replace
from flame.wire.envelope import Sealed

if TYPE_CHECKING:
    from flame.protocols.paillier import EncryptedVector
    from flame.protocols.paillier.plaintext_proof import Opening
    from flame.secure.keys import SecureKeys

__all__ = ["SCHEME", "seal"]

SCHEME = "paillier"


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
            from flame.secure.contributions import sign_contribution

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

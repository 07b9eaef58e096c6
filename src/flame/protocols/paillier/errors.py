"""Errors of the Paillier layer: every refusal is a SecureAggregationError subclass."""

from __future__ import annotations

from flame.errors import FlameError

__all__ = [
    "AggregationOverflowError",
    "ContributorCountError",
    "InsecureKeyError",
    "KeyFileError",
    "KeyMismatchError",
    "SecureAggregationError",
    "SpecMismatchError",
    "SumMismatchError",
    "ValueOutOfBoundsError",
    "WireFormatError",
]

MIN_CONTRIBUTORS_FIX = (
    " (FLAME_SECURE__MIN_CONTRIBUTORS / secure.min_contributors of the key holder: run with "
    "more nodes or lower it)"
)
"""What a refusal for too few contributors adds: the setting behind it and the way out."""


class SecureAggregationError(FlameError, ValueError):
    """Base class: every refusal of this module. Messages never contain key material."""


class InsecureKeyError(SecureAggregationError):
    """A key below MIN_KEY_BITS was requested or loaded without ``allow_insecure``."""


class KeyFileError(SecureAggregationError):
    """A key file is missing, unreadable or malformed; the message names the file."""


class KeyMismatchError(SecureAggregationError):
    """A ciphertext was made under a different public key than the one at hand."""


class ValueOutOfBoundsError(SecureAggregationError):
    """An input value is NaN, infinite or beyond the declared bound; nothing was encrypted."""

    def __init__(self, message: str, *, field: str, index: tuple[int, ...]) -> None:
        super().__init__(message)
        self.field = field
        self.index = index


class ContributorCountError(SecureAggregationError):
    """A sum would exceed max_nodes contributors, or has fewer than the required minimum."""


class AggregationOverflowError(SecureAggregationError):
    """A decrypted slot lies outside what honest contributions can produce."""


class SpecMismatchError(SecureAggregationError):
    """A ciphertext vector was encoded with a different SecureSumSpec than the one given."""


class WireFormatError(SecureAggregationError):
    """Bytes from the wire are not a valid ciphertext vector for this key."""


class SumMismatchError(SecureAggregationError):
    """A reported plaintext sum does not match the encrypted sum it claims to decrypt."""

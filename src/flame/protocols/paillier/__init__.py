"""Paillier secure summation, one module per concern.

keys (single-key files), encoding (fixed point, slots), cipher (encryption, decryption),
wire (EncryptedVector and its bytes), pool (worker processes), errors; _math holds the
number theory. The single-key mode (every analysis node holds the private key) is for
``flame simulate --secure`` and small trusted set-ups.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what mypy sees; at run time a name loads on first use (phe, gmpy2)
    from flame.protocols.paillier.cipher import Encryptor, Obfuscation, encrypt_vector
    from flame.protocols.paillier.decrypt import (
        decrypt_fixed_point,
        decrypt_raw,
        decrypt_vector,
        verify_reported_sum,
    )
    from flame.protocols.paillier.encoding import SecureSumSpec, SlotLayout, encode_fixed_point
    from flame.protocols.paillier.errors import (
        AggregationOverflowError,
        ContributorCountError,
        InsecureKeyError,
        KeyFileError,
        KeyMismatchError,
        SecureAggregationError,
        SpecMismatchError,
        SumMismatchError,
        ValueOutOfBoundsError,
        WireFormatError,
    )
    from flame.protocols.paillier.keys import (
        MIN_KEY_BITS,
        generate_keypair,
        key_id,
        load_private_key,
        load_public_key,
        write_keypair,
    )
    from flame.protocols.paillier.pool import shutdown_workers
    from flame.protocols.paillier.wire import EncryptedVector

# public name -> its module: importing .errors alone (as masking does) loads no phe
_LAZY: dict[str, str] = {
    "Encryptor": "flame.protocols.paillier.cipher",
    "Obfuscation": "flame.protocols.paillier.cipher",
    "encrypt_vector": "flame.protocols.paillier.cipher",
    "decrypt_fixed_point": "flame.protocols.paillier.decrypt",
    "decrypt_raw": "flame.protocols.paillier.decrypt",
    "decrypt_vector": "flame.protocols.paillier.decrypt",
    "verify_reported_sum": "flame.protocols.paillier.decrypt",
    "SecureSumSpec": "flame.protocols.paillier.encoding",
    "SlotLayout": "flame.protocols.paillier.encoding",
    "encode_fixed_point": "flame.protocols.paillier.encoding",
    "AggregationOverflowError": "flame.protocols.paillier.errors",
    "ContributorCountError": "flame.protocols.paillier.errors",
    "InsecureKeyError": "flame.protocols.paillier.errors",
    "KeyFileError": "flame.protocols.paillier.errors",
    "KeyMismatchError": "flame.protocols.paillier.errors",
    "SecureAggregationError": "flame.protocols.paillier.errors",
    "SpecMismatchError": "flame.protocols.paillier.errors",
    "SumMismatchError": "flame.protocols.paillier.errors",
    "ValueOutOfBoundsError": "flame.protocols.paillier.errors",
    "WireFormatError": "flame.protocols.paillier.errors",
    "MIN_KEY_BITS": "flame.protocols.paillier.keys",
    "generate_keypair": "flame.protocols.paillier.keys",
    "key_id": "flame.protocols.paillier.keys",
    "load_private_key": "flame.protocols.paillier.keys",
    "load_public_key": "flame.protocols.paillier.keys",
    "write_keypair": "flame.protocols.paillier.keys",
    "shutdown_workers": "flame.protocols.paillier.pool",
    "EncryptedVector": "flame.protocols.paillier.wire",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "MIN_KEY_BITS",
    "AggregationOverflowError",
    "ContributorCountError",
    "EncryptedVector",
    "Encryptor",
    "InsecureKeyError",
    "KeyFileError",
    "KeyMismatchError",
    "Obfuscation",
    "SecureAggregationError",
    "SecureSumSpec",
    "SlotLayout",
    "SpecMismatchError",
    "SumMismatchError",
    "ValueOutOfBoundsError",
    "WireFormatError",
    "decrypt_fixed_point",
    "decrypt_raw",
    "decrypt_vector",
    "encode_fixed_point",
    "encrypt_vector",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "shutdown_workers",
    "verify_reported_sum",
    "write_keypair",
]

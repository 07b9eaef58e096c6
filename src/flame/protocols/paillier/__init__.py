"""Paillier secure summation, one module per concern.

keys (single-key files), encoding (fixed point, slots), cipher (encryption, decryption),
wire (EncryptedVector and its bytes), pool (worker processes), errors; _math holds the
number theory. The single-key mode (every analysis node holds the private key) is for
``flame simulate --secure`` and small trusted set-ups.
"""

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

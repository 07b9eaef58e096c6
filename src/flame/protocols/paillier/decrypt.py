"""Single-key Paillier decryption of packed vectors, and checking a reported sum.

The counterpart of `flame.protocols.paillier.cipher` on the key holder's side: the sum of
the nodes' `EncryptedVector`s comes back from the aggregator, is checked against the key
and the spec, decrypted with the factorisation (CRT) on all cores, and unpacked.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import Any

import gmpy2
import numpy as np
import numpy.typing as npt
from phe.paillier import PaillierPrivateKey

from flame.protocols.paillier import _math as pm
from flame.protocols.paillier._math import Mpz
from flame.protocols.paillier.encoding import SecureSumSpec, _unpack
from flame.protocols.paillier.errors import (
    MIN_CONTRIBUTORS_FIX,
    ContributorCountError,
    KeyMismatchError,
    SecureAggregationError,
    SpecMismatchError,
    SumMismatchError,
)
from flame.protocols.paillier.keys import key_id
from flame.protocols.paillier.pool import available_cores
from flame.protocols.paillier.wire import EncryptedVector, check_ciphertexts

__all__ = ["decrypt_fixed_point", "decrypt_raw", "decrypt_vector", "verify_reported_sum"]


def _check_decryptable(
    enc: EncryptedVector,
    private_key: PaillierPrivateKey,
    spec: SecureSumSpec,
    min_contributors: int,
) -> None:
    expected = key_id(private_key.public_key)
    if enc.key_id != expected:
        raise KeyMismatchError(f"vector is under key {enc.key_id}, private key is {expected}")
    if spec.layout(private_key.public_key) != enc.layout:
        raise SpecMismatchError(
            "the vector was encoded with a different SecureSumSpec (precision, bound or "
            "max_nodes) than the one given for decryption"
        )
    if min_contributors < 1:
        raise SecureAggregationError("min_contributors must be at least 1")
    if enc.contributors < min_contributors:
        raise ContributorCountError(
            f"refusing to decrypt a sum of {enc.contributors} contribution(s); "
            f"at least {min_contributors} are required{MIN_CONTRIBUTORS_FIX}"
        )


def _decrypt_ciphertexts(
    ciphertexts: Sequence[Mpz], private_key: PaillierPrivateKey, workers: int | None
) -> list[Mpz]:
    threads = available_cores() if workers is None else max(1, workers)
    decryptor = pm.CrtDecryptor(
        int(private_key.public_key.n), int(private_key.p), int(private_key.q)
    )
    return decryptor.decrypt(ciphertexts, threads=threads)


def _to_float(sums: npt.NDArray[Any], spec: SecureSumSpec) -> npt.NDArray[np.float64]:
    if sums.dtype == object:
        floats = np.array([float(s) for s in sums], dtype=np.float64)
    else:
        floats = sums.astype(np.float64)
    return floats / spec.scale


def decrypt_vector(
    enc: EncryptedVector,
    private_key: PaillierPrivateKey,
    spec: SecureSumSpec,
    *,
    min_contributors: int,
    workers: int | None = None,
) -> npt.NDArray[np.float64]:
    """The float64 sum, shaped like the encrypted input.

    Refuses a sum of fewer than min_contributors (one node's own vector must never be
    decrypted by the others), a different key or spec, and any slot that honest
    contributions could not have produced. Error is at most spec.max_error(contributors).
    """
    _check_decryptable(enc, private_key, spec, min_contributors)
    plaintexts = _decrypt_ciphertexts(enc.ciphertexts, private_key, workers)
    sums = _unpack(plaintexts, enc.layout, enc.size, enc.contributors)
    return _to_float(sums, spec).reshape(enc.shape)


def decrypt_fixed_point(
    enc: EncryptedVector,
    private_key: PaillierPrivateKey,
    spec: SecureSumSpec,
    *,
    min_contributors: int,
    workers: int | None = None,
) -> list[int]:
    """The exact integer sums (flattened) of the encoded values: for exact checks."""
    _check_decryptable(enc, private_key, spec, min_contributors)
    plaintexts = _decrypt_ciphertexts(enc.ciphertexts, private_key, workers)
    return [int(s) for s in _unpack(plaintexts, enc.layout, enc.size, enc.contributors)]


def verify_reported_sum(
    enc: EncryptedVector,
    private_key: PaillierPrivateKey,
    spec: SecureSumSpec,
    reported: object,
    *,
    min_contributors: int,
    fraction: float = 1.0,
    workers: int | None = None,
) -> int:
    """Check a sum reported by another node against the encrypted sum; return how many
    ciphertexts were checked.

    Why: one node decrypts and reports, the others confirm. Confirming everything costs
    each of them a full decryption; with ``fraction`` < 1 a node decrypts only a random
    sample of the ciphertexts, picked with the OS's CSPRNG so the reporter cannot predict
    it. If t ciphertexts were misreported, one confirming node misses all of them with
    probability about (1 - fraction)**t. ``reported`` must be decrypt_vector's output; it
    is compared exactly. A mismatch raises SumMismatchError.
    """
    if not 0 < fraction <= 1:
        raise SecureAggregationError("fraction must be in (0, 1]")
    _check_decryptable(enc, private_key, spec, min_contributors)
    claimed = np.asarray(reported)
    if claimed.dtype != np.float64 or tuple(claimed.shape) != enc.shape:
        raise SumMismatchError(
            f"reported sum has shape {tuple(claimed.shape)} and dtype {claimed.dtype}, "
            f"expected shape {enc.shape} and float64"
        )
    n_ct = len(enc.ciphertexts)
    if fraction >= 1:
        picked = list(range(n_ct))
    else:
        count = min(n_ct, max(1, math.ceil(fraction * n_ct)))
        picked = sorted(secrets.SystemRandom().sample(range(n_ct), count))
    plaintexts = _decrypt_ciphertexts([enc.ciphertexts[i] for i in picked], private_key, workers)
    slots = enc.layout.slots_per_ciphertext
    flat = claimed.reshape(-1)
    for i, m in zip(picked, plaintexts, strict=True):
        part = flat[i * slots : (i + 1) * slots]
        sums = _unpack([m], enc.layout, len(part), enc.contributors)
        if not np.array_equal(_to_float(sums, spec), part):
            raise SumMismatchError(
                f"the reported sum differs from the encrypted sum in ciphertext {i} "
                f"(values {i * slots} to {i * slots + len(part) - 1})"
            )
    return len(picked)


def decrypt_raw(private_key: PaillierPrivateKey, ciphertexts: Sequence[int]) -> list[int]:
    """Textbook Paillier decryption of integers (e.g. ``phe`` EncryptedNumber.ciphertext()).

    Each ciphertext is range- and gcd-checked first.
    """
    n = gmpy2.mpz(int(private_key.public_key.n))
    cs = [gmpy2.mpz(int(c)) for c in ciphertexts]
    check_ciphertexts(cs, n, n * n)
    decryptor = pm.CrtDecryptor(int(n), int(private_key.p), int(private_key.q))
    return [int(m) for m in decryptor.decrypt(cs)]

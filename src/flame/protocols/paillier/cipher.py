"""Packed Paillier encryption and (single-key) decryption of vectors.

Why this module exists: plain ``phe`` encrypts one number per 2048-bit plaintext, at about
110 numbers per second per core and 512 bytes each, which makes a parameter vector of a
million entries take hours. Here a vector is fixed-point encoded, many values are packed
into one plaintext (each slot with room for the sum over all nodes, so slots never carry
into each other), and encryption uses the key holder's factorisation (CRT plus fixed-base
tables) and all cores. Keys and single ciphertexts stay phe objects and phe numbers, so
phe can read everything made here and vice versa.

The module knows nothing about networks, brokers or epochs: the federated layer calls
``encrypt_vector`` on each analysis node, ``EncryptedVector.sum`` on the aggregator and
``decrypt_vector`` on the analysis nodes again, and moves ``EncryptedVector.to_bytes()``
between them.

Security notes (the README's threat-model section rests on these):

* ``obfuscation="standard"`` (the default) produces ciphertexts with exactly the textbook
  distribution; security rests on the decisional composite residuosity (DCR) assumption
  only, whichever speed-up is used underneath.
* ``obfuscation="djn"`` uses short random exponents (Damgard-Jurik-Nielsen); it needs an
  extra assumption and is never chosen implicitly.
* Paillier ciphertexts are malleable: whoever holds the public key can add any value
  within the range checks. The aggregator is trusted to add honestly (honest-but-curious).
"""

from __future__ import annotations

import collections
import logging
import math
import secrets
import threading
from collections.abc import Sequence
from typing import Any, Literal

import gmpy2
import numpy as np
import numpy.typing as npt
from phe.paillier import PaillierPrivateKey, PaillierPublicKey

from flame.protocols.paillier import _math as pm
from flame.protocols.paillier._math import Mpz
from flame.protocols.paillier.encoding import SecureSumSpec, _pack, _unpack, encode_fixed_point
from flame.protocols.paillier.errors import (
    MIN_CONTRIBUTORS_FIX,
    ContributorCountError,
    KeyMismatchError,
    SecureAggregationError,
    SpecMismatchError,
    SumMismatchError,
)
from flame.protocols.paillier.keys import key_id
from flame.protocols.paillier.plaintext_proof import Opening
from flame.protocols.paillier.pool import (
    WorkerError,
    available_cores,
    drop_pool,
    process_pool,
)
from flame.protocols.paillier.wire import EncryptedVector, check_ciphertexts

__all__ = [
    "Encryptor",
    "Obfuscation",
    "decrypt_fixed_point",
    "decrypt_raw",
    "decrypt_vector",
    "encrypt_vector",
    "verify_reported_sum",
]

logger = logging.getLogger(__name__)


Obfuscation = Literal["standard", "djn"]
"""How encryption randomness is made; see Encryptor."""


class Encryptor:
    """Encrypts vectors under one key, keeping the precomputation that makes it fast.

    Give it the private key when you hold it (analysis nodes do): the randomness r**n is
    then made modulo p**2 and q**2 with fixed-base tables, ~15x cheaper per ciphertext than
    phe's (and with packing several hundred times more values per second), with exactly
    the textbook ciphertext distribution. That needs a key from generate_keypair; other
    keys get plain CRT, ~3.5x. With the public key only, ``obfuscation="standard"``
    computes r**n mod n**2 as the textbook does.

    ``obfuscation="djn"`` (opt-in) makes the randomness as h_s**a with a short exponent a
    (Damgard-Jurik-Nielsen): fast with the public key alone, but secure only under an extra
    assumption beyond DCR (see the README).

    ``precompute(k)`` makes k obfuscators ahead of time (each is used once), e.g. while
    a node waits for the next epoch; encryption then costs a multiplication per ciphertext.

    Large vectors use all cores: worker processes for the fixed-base paths (pure-Python
    multiplications hold the GIL), threads for the powmod paths (gmpy2 releases the GIL
    there). Vectors below ``parallel_threshold`` ciphertexts stay in this thread.
    """

    def __init__(
        self,
        key: PaillierPublicKey | PaillierPrivateKey,
        *,
        obfuscation: Obfuscation = "standard",
        workers: int | None = None,
        parallel_threshold: int = 256,
    ) -> None:
        if obfuscation not in ("standard", "djn"):
            raise SecureAggregationError("obfuscation must be 'standard' or 'djn'")
        if isinstance(key, PaillierPrivateKey):
            self.public_key: PaillierPublicKey = key.public_key
            self._primes: tuple[int, int] | None = (int(key.p), int(key.q))
        elif isinstance(key, PaillierPublicKey):
            self.public_key = key
            self._primes = None
        else:
            raise TypeError("key must be a phe PaillierPublicKey or PaillierPrivateKey")
        self.obfuscation: Obfuscation = obfuscation
        self.workers = available_cores() if workers is None else max(1, int(workers))
        self.parallel_threshold = max(1, int(parallel_threshold))
        self.key_id = key_id(self.public_key)
        self._n = gmpy2.mpz(int(self.public_key.n))
        self._nsquare = self._n * self._n
        self._width = (int(self._nsquare).bit_length() + 7) // 8
        self._source: pm.ObfuscatorSource | None = None
        self._lock = threading.Lock()
        self._pool: collections.deque[Mpz] = collections.deque()
        self._opened: collections.deque[tuple[Mpz, Mpz]] = collections.deque()
        self._opened_source: pm.PlainSource | pm.DjnSource | None = None

    def __repr__(self) -> str:
        return (
            f"<Encryptor key {self.key_id} obfuscation={self.obfuscation} workers={self.workers}>"
        )

    @property
    def method(self) -> str:
        """Which obfuscator source is in use: crt-fixed, crt, plain or djn."""
        return self._get_source().kind

    def _get_source(self) -> pm.ObfuscatorSource:
        with self._lock:
            if self._source is None:
                self._source = self._make_source()
                logger.debug("Paillier key %s: obfuscators via %s", self.key_id, self._source.kind)
            return self._source

    def _make_source(self) -> pm.ObfuscatorSource:
        if self.obfuscation == "djn":
            return pm.DjnSource(int(self._n))
        if self._primes is None:
            return pm.PlainSource(int(self._n))
        p, q = self._primes
        fast = pm.CrtFixedBaseSource.try_create(p, q)
        if fast is not None:
            return fast
        logger.info(
            "Paillier key %s was not generated by flame; encrypting with plain CRT "
            "(correct, but slower than with a key from 'flame keys generate')",
            self.key_id,
        )
        return pm.CrtSource(p, q)

    def precompute(self, n_ciphertexts: int, *, opened: bool = False) -> None:
        """Make n_ciphertexts obfuscators now for later encryptions (each used once);
        ``opened``: for `encrypt_opened`, each kept with its randomness."""
        if opened:
            values, randomness = self._fresh_opened(int(n_ciphertexts))
            with self._lock:
                self._opened.extend(zip(values, randomness, strict=True))
            return
        fresh = self._fresh(int(n_ciphertexts))
        with self._lock:
            self._pool.extend(fresh)

    @property
    def precomputed(self) -> int:
        """How many precomputed obfuscators are left."""
        return len(self._pool)

    @property
    def precomputed_opened(self) -> int:
        """How many precomputed obfuscators with their randomness are left."""
        return len(self._opened)

    def _get_opened_source(self) -> pm.PlainSource | pm.DjnSource:
        """Where obfuscators with known randomness come from: the DJN source (whose h is
        known here), else textbook r**n (the fixed-base CRT sources do not yield r)."""
        if self.obfuscation == "djn":
            source = self._get_source()
            assert isinstance(source, pm.DjnSource)
            return source
        with self._lock:
            if self._opened_source is None:
                self._opened_source = pm.PlainSource(int(self._n))
            return self._opened_source

    def _fresh_opened(self, count: int) -> tuple[list[Mpz], list[Mpz]]:
        if count <= 0:
            return [], []
        source = self._get_opened_source()
        if self.workers > 1 and count >= self.parallel_threshold:
            if source.gil_free:
                return source.generate_opened(count, threads=self.workers)
            pool = process_pool(self.workers)
            n_chunks = max(1, min(self.workers * 4, count // 32))
            step = -(-count // n_chunks)
            sizes = [min(step, count - i) for i in range(0, count, step)]
            try:
                blobs = pool.generate(
                    source.kind + pm.OPENED, source.params(), sizes, 2 * self._width
                )
            except (WorkerError, OSError) as exc:
                logger.warning(
                    "Paillier worker processes failed (%s); encrypting in this process", exc
                )
                drop_pool(self.workers, pool)
                return source.generate_opened(count)
            width = self._width
            values: list[Mpz] = []
            randomness: list[Mpz] = []
            for blob in blobs:
                for i in range(0, len(blob), 2 * width):
                    values.append(gmpy2.mpz(int.from_bytes(blob[i : i + width], "big")))
                    randomness.append(
                        gmpy2.mpz(int.from_bytes(blob[i + width : i + 2 * width], "big"))
                    )
            if len(values) != count:  # pragma: no cover - defensive
                raise SecureAggregationError("worker processes returned a wrong number of values")
            return values, randomness
        return source.generate_opened(count)

    def encrypt_opened(
        self, values: object, spec: SecureSumSpec, *, field: str = "value"
    ) -> tuple[EncryptedVector, Opening]:
        """`encrypt`, also returning the plaintext integers and randomness: the opening a
        proof of plaintext knowledge needs (threshold mode). Keep it secret."""
        layout = spec.layout(self.public_key)
        encoded = encode_fixed_point(values, spec, field=field)
        biased = encoded.reshape(-1) + np.int64(layout.max_abs)
        plaintexts = [int(m) for m in _pack(biased, layout)]
        count = len(plaintexts)
        with self._lock:
            taken = [self._opened.popleft() for _ in range(min(count, len(self._opened)))]
        if len(taken) < count:
            more, more_r = self._fresh_opened(count - len(taken))
            taken.extend(zip(more, more_r, strict=True))
        n, nsquare = self._n, self._nsquare
        ciphertexts = [
            (m * n + 1) * r % nsquare for m, (r, _) in zip(plaintexts, taken, strict=True)
        ]
        source = self._get_opened_source()
        base = source.h if isinstance(source, pm.DjnSource) else None
        opening = Opening(tuple(plaintexts), tuple(x for _, x in taken), base)
        shape = tuple(int(s) for s in encoded.shape)
        return EncryptedVector(self.public_key, layout, shape, 1, ciphertexts), opening

    def _obfuscators(self, count: int) -> list[Mpz]:
        with self._lock:
            taken = [self._pool.popleft() for _ in range(min(count, len(self._pool)))]
        if len(taken) < count:
            taken.extend(self._fresh(count - len(taken)))
        return taken

    def _fresh(self, count: int) -> list[Mpz]:
        if count <= 0:
            return []
        source = self._get_source()
        if self.workers > 1 and count >= self.parallel_threshold:
            if source.gil_free:
                return source.generate(count, threads=self.workers)
            return self._in_processes(source, count)
        return source.generate(count)

    def _in_processes(self, source: pm.ObfuscatorSource, count: int) -> list[Mpz]:
        pool = process_pool(self.workers)
        n_chunks = max(1, min(self.workers * 4, count // 32))
        step = -(-count // n_chunks)
        sizes = [min(step, count - i) for i in range(0, count, step)]
        try:
            blobs = pool.generate(source.kind, source.params(), sizes, self._width)
        except (WorkerError, OSError) as exc:
            logger.warning(
                "Paillier worker processes failed (%s); encrypting in this process instead", exc
            )
            drop_pool(self.workers, pool)
            return source.generate(count)
        width = self._width
        out: list[Mpz] = []
        for blob in blobs:
            out.extend(
                gmpy2.mpz(int.from_bytes(blob[i : i + width], "big"))
                for i in range(0, len(blob), width)
            )
        if len(out) != count:  # pragma: no cover - defensive
            raise SecureAggregationError("worker processes returned a wrong number of values")
        return out

    def _encrypt_ints(self, plaintexts: Sequence[int]) -> list[Mpz]:
        n, nsquare = self._n, self._nsquare
        obfuscators = self._obfuscators(len(plaintexts))
        return [(m * n + 1) * r % nsquare for m, r in zip(plaintexts, obfuscators, strict=True)]

    def encrypt(
        self, values: object, spec: SecureSumSpec, *, field: str = "value"
    ) -> EncryptedVector:
        """Encode, bound-check, pack and encrypt `values` (array, list or scalar).

        Every value is checked before anything is encrypted: a value past the bound raises
        ValueOutOfBoundsError naming `field` and the index.
        """
        layout = spec.layout(self.public_key)
        encoded = encode_fixed_point(values, spec, field=field)
        biased = encoded.reshape(-1) + np.int64(layout.max_abs)
        ciphertexts = self._encrypt_ints(_pack(biased, layout))
        shape = tuple(int(s) for s in encoded.shape)
        return EncryptedVector(self.public_key, layout, shape, 1, ciphertexts)

    def encrypt_raw(self, plaintexts: Sequence[int]) -> list[int]:
        """Textbook Paillier ciphertexts of integers in [0, n): what phe's raw_decrypt reads.

        No encoding or packing; for interoperation with phe (``EncryptedNumber(public_key,
        c)`` wraps a result) and for tests.
        """
        n = int(self._n)
        for i, m in enumerate(plaintexts):
            if not isinstance(m, int) or not 0 <= m < n:
                raise SecureAggregationError(f"plaintext {i} must be an int in [0, n)")
        return [int(c) for c in self._encrypt_ints(plaintexts)]


# --------------------------------------------------------------------------- convenience

_ENCRYPTORS: collections.OrderedDict[tuple[str, bool, str, int | None], Encryptor] = (
    collections.OrderedDict()
)
_ENCRYPTORS_LOCK = threading.Lock()
_ENCRYPTOR_CACHE_SIZE = 4


def _encryptor_for(
    key: PaillierPublicKey | PaillierPrivateKey, obfuscation: Obfuscation, workers: int | None
) -> Encryptor:
    public = key.public_key if isinstance(key, PaillierPrivateKey) else key
    cache_key = (key_id(public), isinstance(key, PaillierPrivateKey), obfuscation, workers)
    with _ENCRYPTORS_LOCK:
        enc = _ENCRYPTORS.get(cache_key)
        if enc is not None and int(enc.public_key.n) == int(public.n):
            _ENCRYPTORS.move_to_end(cache_key)
            return enc
        enc = Encryptor(key, obfuscation=obfuscation, workers=workers)
        _ENCRYPTORS[cache_key] = enc
        while len(_ENCRYPTORS) > _ENCRYPTOR_CACHE_SIZE:
            _ENCRYPTORS.popitem(last=False)
        return enc


def encrypt_vector(
    values: object,
    key: PaillierPublicKey | PaillierPrivateKey,
    spec: SecureSumSpec,
    *,
    field: str = "value",
    obfuscation: Obfuscation = "standard",
    workers: int | None = None,
) -> EncryptedVector:
    """Encrypt a numeric array, list or scalar for secure summation.

    Pass the private key when this node holds it: same ciphertexts, many times faster (see
    Encryptor). The Encryptor and its tables are cached per key, so repeated calls (one
    per epoch) pay the set-up once.
    """
    return _encryptor_for(key, obfuscation, workers).encrypt(values, spec, field=field)


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

"""Number theory behind flame's Paillier layer: primes, obfuscators, CRT decryption.

Kept apart from the public module for two reasons. First, the worker processes that make
obfuscators for large vectors import only this module; they receive plain ints and return
bytes, so nothing but numbers crosses a process boundary. Second, every place where a
random value is drawn lives here, which makes the distribution arguments (see
``CrtFixedBaseSource``) reviewable in one screen.

Everything is gmpy2 integers; gmpy2 ships no type information, so they are typed ``Mpz``
(an alias of ``Any``).
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import gmpy2

Mpz = Any
"""A gmpy2.mpz (gmpy2 has no stubs)."""

PRIME_ROUNDS = 40
"""Argument to gmpy2.is_prime: a Baillie-PSW test plus extra Miller-Rabin rounds."""

SMALL_PRIME_LIMIT = 1 << 16
"""Trial-division limit used to recognise keys whose p - 1 we can factor."""

K_BITS = 16
"""Flame's primes have p - 1 = 2 * k * r with r prime and k < 2**K_BITS."""

MIN_THREAD_CHUNK = 16
"""Below this many powmods per thread, starting threads costs more than it saves."""


@functools.lru_cache(maxsize=1)
def small_primes() -> tuple[int, ...]:
    """Primes below SMALL_PRIME_LIMIT (a sieve; cached, ~6500 numbers)."""
    limit = SMALL_PRIME_LIMIT
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\x00\x00"
    for i in range(2, math.isqrt(limit) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(range(i * i, limit, i)))
    return tuple(i for i, flag in enumerate(sieve) if flag)


def is_probable_prime(x: int | Mpz) -> bool:
    """Baillie-PSW plus Miller-Rabin; no known composite passes."""
    return bool(gmpy2.is_prime(gmpy2.mpz(x), PRIME_ROUNDS))


def _random_prime(bits: int) -> Mpz:
    """A uniformly random prime of exactly `bits` bits (rejection sampling, not next_prime)."""
    top = gmpy2.mpz(1) << (bits - 1)
    while True:
        candidate = top | gmpy2.mpz(secrets.randbits(bits - 1)) | 1
        if gmpy2.is_prime(candidate, PRIME_ROUNDS):
            return candidate


def _distinct_small_factors(k: int) -> list[int]:
    factors: list[int] = []
    for s in small_primes():
        if s * s > k:
            break
        if k % s == 0:
            factors.append(s)
            while k % s == 0:
                k //= s
    if k > 1:
        factors.append(k)
    return factors


def generate_structured_prime(bits: int) -> tuple[Mpz, tuple[Mpz, ...]]:
    """A prime p of `bits` bits with p >= 3 * 2**(bits-2), and the distinct primes of p - 1.

    Why the structure: p - 1 = 2 * k * r with r a uniformly random prime of bits - 16 bits
    and k < 2**16. Knowing the factorisation of p - 1 lets the key holder find a generator
    of Z_p* and then make Paillier obfuscators by fixed-base exponentiation, with exactly
    the textbook distribution (see CrtFixedBaseSource). The large prime factor r also makes
    p resistant to Pollard's p - 1 method, as with safe primes (k = 1), which are much
    slower to find. The lower bound on p makes a product of two such primes have exactly
    2 * bits bits.
    """
    if bits < 64:
        raise ValueError("prime size must be at least 64 bits")
    low = 3 * (gmpy2.mpz(1) << (bits - 2))
    high = (gmpy2.mpz(1) << bits) - 1
    while True:
        r = _random_prime(bits - K_BITS)
        k_low = int((low - 1 + 2 * r - 1) // (2 * r))
        k_high = int((high - 1) // (2 * r))
        for _ in range(4000):
            k = k_low + secrets.randbelow(k_high - k_low + 1)
            p = 2 * k * r + 1
            if gmpy2.is_prime(p, PRIME_ROUNDS):
                assert low <= p <= high
                factors = tuple(gmpy2.mpz(f) for f in [2, *_distinct_small_factors(k)])
                distinct = (*sorted(set(factors)), r)
                return p, distinct


def factor_p_minus_1(p: Mpz) -> tuple[Mpz, ...] | None:
    """Distinct prime factors of p - 1 if p - 1 is (2**16-smooth) * (one prime), else None.

    Flame's own primes always pass; primes from other generators (phe's, say) almost never
    do, and then the caller falls back to plain CRT encryption.
    """
    m = gmpy2.mpz(p) - 1
    factors: list[Mpz] = []
    for s in small_primes():
        if m % s == 0:
            factors.append(gmpy2.mpz(s))
            while m % s == 0:
                m //= s
    if m == 1:
        return tuple(factors)
    if is_probable_prime(m):
        return (*factors, m)
    return None


def find_generator(p: Mpz, factors: Sequence[Mpz]) -> Mpz:
    """A random generator of Z_p*, given the distinct prime factors of p - 1."""
    phi = gmpy2.mpz(p) - 1
    while True:
        g = gmpy2.mpz(2 + secrets.randbelow(int(p) - 3))
        if all(gmpy2.powmod(g, phi // f, p) != 1 for f in factors):
            return g


class FixedBase:
    """base**e mod m for many random e, with a table of base**(d * 256**i).

    Why: one exponentiation becomes about exponent_bits / 8 modular multiplications instead
    of exponent_bits squarings plus multiplications, ~6x fewer. The table costs
    (exponent_bits / 8) * 256 residues: 8 MiB for a 1024-bit exponent modulo a 2048-bit
    number.
    """

    __slots__ = ("_nbytes", "_rows", "modulus")

    def __init__(self, base: Mpz, modulus: Mpz, exponent_bits: int) -> None:
        self.modulus = gmpy2.mpz(modulus)
        self._nbytes = (exponent_bits + 7) // 8
        rows: list[list[Mpz]] = []
        b = gmpy2.mpz(base) % self.modulus
        one = gmpy2.mpz(1)
        for _ in range(self._nbytes):
            row = [one, b]
            x = b
            for _ in range(254):
                x = x * b % self.modulus
                row.append(x)
            rows.append(row)
            b = x * b % self.modulus
        self._rows = rows

    def pow(self, exponent: int) -> Mpz:
        """base**exponent mod m, for 0 <= exponent < 2**(8 * nbytes)."""
        modulus = self.modulus
        acc = gmpy2.mpz(1)
        for row, digit in zip(self._rows, exponent.to_bytes(self._nbytes, "little"), strict=True):
            if digit:
                acc = acc * row[digit] % modulus
        return acc


def powmod_base_list(bases: Sequence[Mpz], exponent: Mpz, modulus: Mpz, threads: int) -> list[Mpz]:
    """[b**exponent mod modulus for b in bases], on `threads` threads.

    gmpy2.powmod_base_list releases the GIL, so plain threads use all cores here (measured:
    1.8x on 2 cores) without the start-up cost and data copies of a process pool.
    """
    count = len(bases)
    threads = max(1, min(threads, count // MIN_THREAD_CHUNK))
    if threads == 1:
        return list(gmpy2.powmod_base_list(list(bases), exponent, modulus))
    step = -(-count // threads)
    chunks = [list(bases[i : i + step]) for i in range(0, count, step)]
    with ThreadPoolExecutor(max_workers=len(chunks), thread_name_prefix="flame-powmod") as pool:
        parts = list(pool.map(lambda c: gmpy2.powmod_base_list(c, exponent, modulus), chunks))
    return [x for part in parts for x in part]


class ObfuscatorSource(Protocol):
    """Makes Paillier obfuscators: random n-th residues modulo n**2 (r**n for a random r)."""

    kind: str
    gil_free: bool

    def params(self) -> tuple[int, ...]:
        """The ints a worker process needs to rebuild this source."""
        ...

    def generate(self, count: int, threads: int = 1) -> list[Mpz]:
        """`count` fresh obfuscators, each to be used once."""
        ...


class PlainSource:
    """Textbook r**n mod n**2 with r uniform in [1, n): all a public-key holder can do."""

    kind = "plain"
    gil_free = True

    def __init__(self, n: int) -> None:
        self.n = gmpy2.mpz(n)
        self.nsquare = self.n * self.n

    def params(self) -> tuple[int, ...]:
        return (int(self.n),)

    def generate(self, count: int, threads: int = 1) -> list[Mpz]:
        upper = int(self.n) - 1
        rs = [gmpy2.mpz(1 + secrets.randbelow(upper)) for _ in range(count)]
        return powmod_base_list(rs, self.n, self.nsquare, threads)

    def generate_opened(self, count: int, threads: int = 1) -> tuple[list[Mpz], list[Mpz]]:
        """Obfuscators r**n and the r they were made from (for a proof of knowledge)."""
        upper = int(self.n) - 1
        rs = [gmpy2.mpz(1 + secrets.randbelow(upper)) for _ in range(count)]
        return powmod_base_list(rs, self.n, self.nsquare, threads), rs


class _CrtCombiner:
    """Joins residues modulo p**2 and q**2 into one modulo n**2."""

    def __init__(self, p: Mpz, q: Mpz) -> None:
        self.psquare = p * p
        self.qsquare = q * q
        self.p2_inverse = gmpy2.invert(self.psquare, self.qsquare)

    def join(self, a: Mpz, b: Mpz) -> Mpz:
        return a + self.psquare * ((b - a) * self.p2_inverse % self.qsquare)


class CrtSource:
    """r**n mod n**2 for the key holder: x**p mod p**2 and y**q mod q**2, joined by CRT.

    Same distribution as PlainSource, ~3.5x cheaper: r**n mod p**2 depends only on r mod p
    and equals (r mod p)**p raised to q, a bijection on the order-(p-1) subgroup because q
    does not divide p - 1; and x -> x**p mod p**2 maps [1, p) one-to-one onto that subgroup.
    So x**p for uniform x in [1, p) is uniform there, exactly like r**n.
    """

    kind = "crt"
    gil_free = True

    def __init__(self, p: int, q: int) -> None:
        self.p = gmpy2.mpz(p)
        self.q = gmpy2.mpz(q)
        self._crt = _CrtCombiner(self.p, self.q)

    def params(self) -> tuple[int, ...]:
        return (int(self.p), int(self.q))

    def generate(self, count: int, threads: int = 1) -> list[Mpz]:
        xs = [gmpy2.mpz(1 + secrets.randbelow(int(self.p) - 1)) for _ in range(count)]
        ys = [gmpy2.mpz(1 + secrets.randbelow(int(self.q) - 1)) for _ in range(count)]
        half = max(1, threads // 2) if threads > 1 else 1
        if threads > 1:
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="flame-crt") as pool:
                fp = pool.submit(powmod_base_list, xs, self.p, self._crt.psquare, half)
                fq = pool.submit(powmod_base_list, ys, self.q, self._crt.qsquare, half)
                a, b = fp.result(), fq.result()
        else:
            a = powmod_base_list(xs, self.p, self._crt.psquare, 1)
            b = powmod_base_list(ys, self.q, self._crt.qsquare, 1)
        join = self._crt.join
        return [join(x, y) for x, y in zip(a, b, strict=True)]


class CrtFixedBaseSource:
    """CrtSource's distribution at fixed-base speed, for keys whose p - 1 and q - 1 we factor.

    Let G = g**p mod p**2 for a generator g of Z_p*. G generates the order-(p-1) subgroup
    of Z_{p**2}*, so G**a for a uniform in [0, p - 1) is uniform in that subgroup -- exactly
    the distribution of r**n mod p**2 (see CrtSource). Same for q; CRT joins the halves.
    No assumption beyond Paillier's own (DCR); the only cost is a table per prime.
    """

    kind = "crt-fixed"
    gil_free = False

    def __init__(self, p: int, q: int, gp: int, gq: int) -> None:
        self.p = gmpy2.mpz(p)
        self.q = gmpy2.mpz(q)
        self.gp = gmpy2.mpz(gp)
        self.gq = gmpy2.mpz(gq)
        self._crt = _CrtCombiner(self.p, self.q)
        self._tables: tuple[FixedBase, FixedBase] | None = None

    @classmethod
    def try_create(cls, p: int, q: int) -> CrtFixedBaseSource | None:
        """The source if both p - 1 and q - 1 factor (always for flame's keys), else None."""
        fp = factor_p_minus_1(p)
        fq = factor_p_minus_1(q) if fp is not None else None
        if fp is None or fq is None:
            return None
        return cls(p, q, find_generator(p, fp), find_generator(q, fq))

    def params(self) -> tuple[int, ...]:
        return (int(self.p), int(self.q), int(self.gp), int(self.gq))

    def _ensure_tables(self) -> tuple[FixedBase, FixedBase]:
        if self._tables is None:
            psq, qsq = self._crt.psquare, self._crt.qsquare
            tp = FixedBase(gmpy2.powmod(self.gp, self.p, psq), psq, self.p.bit_length())
            tq = FixedBase(gmpy2.powmod(self.gq, self.q, qsq), qsq, self.q.bit_length())
            self._tables = (tp, tq)
        return self._tables

    def generate(self, count: int, threads: int = 1) -> list[Mpz]:
        tp, tq = self._ensure_tables()
        p1, q1 = int(self.p) - 1, int(self.q) - 1
        join = self._crt.join
        return [
            join(tp.pow(secrets.randbelow(p1)), tq.pow(secrets.randbelow(q1))) for _ in range(count)
        ]


class DjnSource:
    """Damgard-Jurik-Nielsen obfuscators h_s**a with a short random exponent a.

    h_s = (-x**2)**n mod n**2 for a random x, drawn once per source; a is uniform below
    2**ceil(bits(n)/2). Fast for anyone holding only the public key, but it rests on an
    extra assumption (that h_s**a with such short a cannot be told from a random n-th
    residue), so it is only used when asked for by name.
    """

    kind = "djn"
    gil_free = False

    def __init__(self, n: int, hs: int | None = None, exponent_bits: int | None = None) -> None:
        self.n = gmpy2.mpz(n)
        self.nsquare = self.n * self.n
        self.exponent_bits = exponent_bits or (self.n.bit_length() + 1) // 2
        self.h: Mpz | None = None
        """h mod n (h_s = h**n), known only where the source was drawn: proofs need it."""
        if hs is None:
            while True:
                x = gmpy2.mpz(1 + secrets.randbelow(int(self.n) - 1))
                if gmpy2.gcd(x, self.n) == 1:
                    break
            self.h = (-x * x) % self.n
            hs = gmpy2.powmod(self.h, self.n, self.nsquare)
        self.hs = gmpy2.mpz(hs)
        self._table: FixedBase | None = None

    def params(self) -> tuple[int, ...]:
        return (int(self.n), int(self.hs), self.exponent_bits)

    def generate(self, count: int, threads: int = 1) -> list[Mpz]:
        if self._table is None:
            self._table = FixedBase(self.hs, self.nsquare, self.exponent_bits)
        table = self._table
        bits = self.exponent_bits
        return [table.pow(secrets.randbits(bits)) for _ in range(count)]

    def generate_opened(self, count: int, threads: int = 1) -> tuple[list[Mpz], list[Mpz]]:
        """Obfuscators h_s**a and their short exponents a (for a proof of knowledge)."""
        if self._table is None:
            self._table = FixedBase(self.hs, self.nsquare, self.exponent_bits)
        table = self._table
        exponents = [gmpy2.mpz(secrets.randbits(self.exponent_bits)) for _ in range(count)]
        return [table.pow(int(a)) for a in exponents], exponents


_BUILDERS: dict[str, Callable[..., ObfuscatorSource]] = {
    PlainSource.kind: PlainSource,
    CrtSource.kind: CrtSource,
    CrtFixedBaseSource.kind: CrtFixedBaseSource,
    DjnSource.kind: DjnSource,
}

_WORKER_SOURCES: dict[tuple[str, tuple[int, ...]], ObfuscatorSource] = {}
_WORKER_CACHE_SIZE = 2


OPENED = "+opened"
"""Suffix of a worker request kind that also returns each obfuscator's randomness."""


def worker_obfuscators(kind: str, params: tuple[int, ...], count: int, width: int) -> bytes:
    """Process-pool entry point: `count` obfuscators as fixed-width big-endian bytes.

    Only ints go in and bytes come out. Each worker keeps the sources (and their tables)
    of the last few keys, so a table is built once per worker, not once per call. With
    kind "<kind>+opened" a record of `width` bytes is an obfuscator and its randomness,
    width / 2 bytes each.
    """
    opened = kind.endswith(OPENED)
    if opened:
        kind = kind[: -len(OPENED)]
    key = (kind, params)
    source = _WORKER_SOURCES.get(key)
    if source is None:
        if len(_WORKER_SOURCES) >= _WORKER_CACHE_SIZE:
            _WORKER_SOURCES.pop(next(iter(_WORKER_SOURCES)))
        source = _BUILDERS[kind](*params)
        _WORKER_SOURCES[key] = source
    if opened:
        if not isinstance(source, PlainSource | DjnSource):
            raise ValueError(f"{kind} obfuscators cannot be opened")
        values, randomness = source.generate_opened(count)
        half = width // 2
        return b"".join(
            int(x).to_bytes(half, "big") + int(r).to_bytes(half, "big")
            for x, r in zip(values, randomness, strict=True)
        )
    return b"".join(int(x).to_bytes(width, "big") for x in source.generate(count))


class CrtDecryptor:
    """Paillier decryption modulo p**2 and q**2 (Paillier 1999, section 7), as phe does it.

    Each half is a (|n|/2)-bit exponent modulo a |n|-bit number: ~4x less work than the
    textbook L(c**lambda mod n**2) * mu.
    """

    def __init__(self, n: int, p: int, q: int) -> None:
        self.n = gmpy2.mpz(n)
        self.p = gmpy2.mpz(min(p, q))
        self.q = gmpy2.mpz(max(p, q))
        self.psquare = self.p * self.p
        self.qsquare = self.q * self.q
        g = self.n + 1
        self.hp = gmpy2.invert((gmpy2.powmod(g, self.p - 1, self.psquare) - 1) // self.p, self.p)
        self.hq = gmpy2.invert((gmpy2.powmod(g, self.q - 1, self.qsquare) - 1) // self.q, self.q)
        self.p_inverse = gmpy2.invert(self.p, self.q)

    def decrypt(self, ciphertexts: Sequence[Mpz], threads: int = 1) -> list[Mpz]:
        """Plaintexts in [0, n) of already validated ciphertexts."""
        p, q = self.p, self.q
        cp = [c % self.psquare for c in ciphertexts]
        cq = [c % self.qsquare for c in ciphertexts]
        xp = powmod_base_list(cp, p - 1, self.psquare, threads)
        xq = powmod_base_list(cq, q - 1, self.qsquare, threads)
        hp, hq, pinv = self.hp, self.hq, self.p_inverse
        out: list[Mpz] = []
        for a, b in zip(xp, xq, strict=True):
            mp = (a - 1) // p * hp % p
            mq = (b - 1) // q * hq % q
            out.append(mp + p * ((mq - mp) * pinv % q))
        return out

"""Paillier secure summation: nodes encrypt, the aggregator adds what it cannot read.

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

import argparse
import base64
import binascii
import collections
import hashlib
import json
import logging
import math
import multiprocessing
import os
import secrets
import stat
import struct
import sys
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import gmpy2
import numpy as np
import numpy.typing as npt
from phe.paillier import PaillierPrivateKey, PaillierPublicKey

from flame.errors import FlameError
from flame.protocols import _paillier_math as pm
from flame.protocols._paillier_math import Mpz

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
    "keys_cli",
    "load_private_key",
    "load_public_key",
    "shutdown_workers",
    "verify_reported_sum",
    "write_keypair",
]

logger = logging.getLogger(__name__)

MIN_KEY_BITS = 2048
"""Smallest modulus accepted without ``allow_insecure`` (about 112-bit security)."""

_MAX_KEY_BITS = 16384
_MAX_KEY_FILE_BYTES = 1 << 20
_MAX_PRECISION = 60
_MAX_ABS_ENCODED = 1 << 62
_MAX_NODES = 1 << 24
_MAX_NDIM = 32

Obfuscation = Literal["standard", "djn"]
"""How encryption randomness is made; see Encryptor."""


# --------------------------------------------------------------------------- errors


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


# --------------------------------------------------------------------------- keys


def key_id(public_key: PaillierPublicKey) -> str:
    """First 16 hex digits of SHA-256(n): names a key in logs, files and wire headers.

    Public information only (n is public); it lets a receiver refuse ciphertexts made
    under another key before doing any arithmetic on them.
    """
    return _key_id_bytes(int(public_key.n)).hex()


def _key_id_bytes(n: int) -> bytes:
    return hashlib.sha256(_int_to_bytes(n)).digest()[:8]


def _int_to_bytes(x: int) -> bytes:
    return x.to_bytes(max(1, (x.bit_length() + 7) // 8), "big")


def _check_key_bits(bits: int, allow_insecure: bool, where: str) -> None:
    if bits < MIN_KEY_BITS and not allow_insecure:
        raise InsecureKeyError(
            f"{where}: a {bits}-bit Paillier modulus is too small; at least {MIN_KEY_BITS} "
            "bits are required (allow_insecure=True exists for tests only)"
        )


def generate_keypair(
    bits: int = MIN_KEY_BITS, *, allow_insecure: bool = False
) -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    """A new phe key pair whose primes let the key holder encrypt ~15x faster than phe.

    The primes have p - 1 = 2*k*r (r a large random prime, k < 2**16), which lets
    Encryptor use fixed-base tables with the textbook ciphertext distribution; to everyone
    else these are ordinary phe keys. 3072 bits is the size recommended beyond 2030.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or bits % 2:
        raise SecureAggregationError("key size must be an even number of bits")
    _check_key_bits(bits, allow_insecure, "generate_keypair")
    if bits < 256 or bits > _MAX_KEY_BITS:
        raise SecureAggregationError(f"key size must be between 256 and {_MAX_KEY_BITS} bits")
    while True:
        p, _ = pm.generate_structured_prime(bits // 2)
        q, _ = pm.generate_structured_prime(bits // 2)
        n = p * q
        if p != q and n.bit_length() == bits and gmpy2.gcd(n, (p - 1) * (q - 1)) == 1:
            break
    public_key = PaillierPublicKey(int(n))
    private_key = PaillierPrivateKey(public_key, int(p), int(q))
    logger.info("generated a %d-bit Paillier key pair, key id %s", bits, key_id(public_key))
    return public_key, private_key


def _b64url(x: int) -> str:
    """phe's JWK integer encoding: base64url of the big-endian bytes, no padding."""
    return base64.urlsafe_b64encode(_int_to_bytes(x)).rstrip(b"=").decode("ascii")


def _b64url_to_int(text: object, path: Path, name: str) -> int:
    if not isinstance(text, str) or not text or len(text) > 8192:
        raise KeyFileError(f"{path}: field '{name}' must be a base64url string")
    if text.strip("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"):
        raise KeyFileError(f"{path}: field '{name}' is not valid base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{path}: field '{name}' is not valid base64url") from None
    return int.from_bytes(raw, "big")


def _public_jwk(public_key: PaillierPublicKey) -> dict[str, Any]:
    return {
        "kty": "DAJ",
        "alg": "PAI-GN1",
        "key_ops": ["encrypt"],
        "n": _b64url(int(public_key.n)),
        "kid": key_id(public_key),
    }


def _write_file(path: Path, text: str, mode: int) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a key behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_keypair(
    out_dir: Path,
    bits: int = MIN_KEY_BITS,
    *,
    allow_insecure: bool = False,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Generate a key pair into out_dir/public_key.json and out_dir/private_key.json.

    The format is phe's documented JWK-style serialisation, so ``pheutil`` and phe code read
    these files. The private file is created with mode 0600; an existing key is never
    replaced unless ``overwrite`` is set, because losing a private key loses every sum
    encrypted under it.
    """
    out_dir = Path(out_dir)
    public_path = out_dir / "public_key.json"
    private_path = out_dir / "private_key.json"
    if not overwrite:
        for path in (public_path, private_path):
            if path.exists():
                raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    public_key, private_key = generate_keypair(bits, allow_insecure=allow_insecure)
    public_jwk = _public_jwk(public_key)
    private_jwk = {
        "kty": "DAJ",
        "key_ops": ["decrypt"],
        "p": _b64url(int(private_key.p)),
        "q": _b64url(int(private_key.q)),
        "pub": public_jwk,
        "kid": public_jwk["kid"],
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_file(private_path, json.dumps(private_jwk) + "\n", 0o600)
        _write_file(public_path, json.dumps(public_jwk) + "\n", 0o644)
    except OSError as exc:
        raise KeyFileError(f"cannot write the key pair to {out_dir}: {exc.strerror}") from None
    logger.info("wrote key pair %s to %s", public_jwk["kid"], out_dir)
    return public_path, private_path


def _read_jwk(path: Path, what: str) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = fh.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} file {path}: {exc.strerror}") from None
    if len(raw) > _MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: too large to be a {what} file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeyFileError(f"{path}: not a {what} file (not valid JSON)") from None
    if not isinstance(data, dict):
        raise KeyFileError(f"{path}: not a {what} file (expected a JSON object)")
    if data.get("kty") != "DAJ":
        raise KeyFileError(f"{path}: not a Paillier {what} file (kty must be 'DAJ')")
    ops = data.get("key_ops")
    if not isinstance(ops, list):
        raise KeyFileError(f"{path}: not a {what} file (missing key_ops)")
    return data


def _public_from_jwk(data: dict[str, Any], path: Path, allow_insecure: bool) -> PaillierPublicKey:
    if "alg" in data and data["alg"] != "PAI-GN1":
        raise KeyFileError(f"{path}: unsupported algorithm (alg must be 'PAI-GN1')")
    n = _b64url_to_int(data.get("n"), path, "n")
    if n < 3 or n % 2 == 0 or n.bit_length() > _MAX_KEY_BITS:
        raise KeyFileError(f"{path}: field 'n' is not a valid Paillier modulus")
    _check_key_bits(n.bit_length(), allow_insecure, str(path))
    return PaillierPublicKey(n)


def load_public_key(path: Path, *, allow_insecure: bool = False) -> PaillierPublicKey:
    """Read a public key file written by write_keypair or by phe's ``pheutil genpkey``.

    A file holding a private key is refused: the aggregator is configured with a public
    key path, and a private key there would let it read every node's values.
    """
    path = Path(path)
    data = _read_jwk(path, "public key")
    if "p" in data or "q" in data or "decrypt" in data["key_ops"]:
        raise KeyFileError(
            f"{path}: holds a private key where a public key was expected; "
            "give this process public_key.json only"
        )
    if "encrypt" not in data["key_ops"]:
        raise KeyFileError(f"{path}: not a public key file (key_ops lacks 'encrypt')")
    return _public_from_jwk(data, path, allow_insecure)


def load_private_key(path: Path, *, allow_insecure: bool = False) -> PaillierPrivateKey:
    """Read a private key file (phe's JWK-style format) and check p * q = n.

    Warns in the log (naming the file, not its content) when the file is readable by
    other users.
    """
    path = Path(path)
    data = _read_jwk(path, "private key")
    if "decrypt" not in data["key_ops"]:
        raise KeyFileError(f"{path}: not a private key file (key_ops lacks 'decrypt')")
    pub = data.get("pub")
    if not isinstance(pub, dict):
        raise KeyFileError(f"{path}: not a private key file (missing 'pub')")
    public_key = _public_from_jwk(pub, path, allow_insecure)
    p = _b64url_to_int(data.get("p"), path, "p")
    q = _b64url_to_int(data.get("q"), path, "q")
    n = int(public_key.n)
    if p < 3 or q < 3 or p == q or p * q != n:
        raise KeyFileError(f"{path}: p and q do not match the public key in the same file")
    if not (pm.is_probable_prime(p) and pm.is_probable_prime(q)):
        raise KeyFileError(f"{path}: p and q are not primes")
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "private key file %s is accessible to other users (mode %o); chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    return PaillierPrivateKey(public_key, p, q)


def keys_cli(argv: Sequence[str] | None = None) -> int:
    """``flame keys generate --bits N --out DIR`` and ``flame keys info FILE``.

    Prints paths and public facts only; a private key never reaches the terminal.
    """
    parser = argparse.ArgumentParser(prog="flame keys", description="Paillier keys for flame.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = commands.add_parser(
        "generate", help="write public_key.json and private_key.json (mode 0600) to a folder"
    )
    gen.add_argument("--bits", type=int, default=MIN_KEY_BITS, help="modulus size (2048, 3072)")
    gen.add_argument("--out", type=Path, default=Path("."), help="output folder (default: .)")
    gen.add_argument("--force", action="store_true", help="replace existing key files")
    info = commands.add_parser("info", help="print the key id and size of a key file")
    info.add_argument("path", type=Path)
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "generate":
            if args.bits < MIN_KEY_BITS:
                print(
                    f"flame keys: --bits {args.bits} is too small; use {MIN_KEY_BITS} or more "
                    "(3072 for data that must stay confidential beyond 2030)",
                    file=sys.stderr,
                )
                return 2
            public_path, private_path = write_keypair(args.out, args.bits, overwrite=args.force)
            print(f"public key:  {public_path}")
            print(f"private key: {private_path}")
            return 0
        try:
            public_key = load_public_key(args.path, allow_insecure=True)
            kind = "public"
        except KeyFileError:
            public_key = load_private_key(args.path, allow_insecure=True).public_key
            kind = "private"
        print(
            f"{args.path}: {kind} key, {int(public_key.n).bit_length()} bits, "
            f"key id {key_id(public_key)}"
        )
        return 0
    except SecureAggregationError as exc:
        print(f"flame keys: {exc}", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class SecureSumSpec:
    """What is summed and how precisely: shared by every node of an analysis.

    precision: fractional bits; a value is stored as round(value * 2**precision), so each
        value is off by at most 2**-(precision + 1) and a sum of k values by
        k * 2**-(precision + 1) (plus float64 rounding of the result).
    bound: the largest |value| a node may send; larger values are refused, never clipped.
    max_nodes: the most contributions one sum may hold; sets the headroom in every slot.

    Smaller bound, precision and max_nodes mean narrower slots: more values per ciphertext
    and less traffic. For 32-bit values (precision=16, bound=32768) and 100 nodes a slot is
    5 bytes, 51 slots per 2048-bit plaintext.
    """

    precision: int
    bound: float
    max_nodes: int

    def __post_init__(self) -> None:
        if not isinstance(self.precision, int) or isinstance(self.precision, bool):
            raise SecureAggregationError("SecureSumSpec.precision must be an int")
        if not 0 <= self.precision <= _MAX_PRECISION:
            raise SecureAggregationError(
                f"SecureSumSpec.precision must be between 0 and {_MAX_PRECISION} bits"
            )
        if isinstance(self.bound, bool) or not isinstance(self.bound, (int, float)):
            raise SecureAggregationError("SecureSumSpec.bound must be a number")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise SecureAggregationError("SecureSumSpec.bound must be finite and positive")
        if not isinstance(self.max_nodes, int) or isinstance(self.max_nodes, bool):
            raise SecureAggregationError("SecureSumSpec.max_nodes must be an int")
        if not 1 <= self.max_nodes <= _MAX_NODES:
            raise SecureAggregationError(
                f"SecureSumSpec.max_nodes must be between 1 and {_MAX_NODES}"
            )
        if math.ldexp(float(self.bound), self.precision) >= _MAX_ABS_ENCODED:
            raise SecureAggregationError(
                "SecureSumSpec: bound * 2**precision must stay below 2**62; "
                "lower the precision or the bound"
            )

    @property
    def scale(self) -> float:
        """2**precision: the factor between a value and its integer encoding."""
        return math.ldexp(1.0, self.precision)

    @property
    def max_abs_encoded(self) -> int:
        """The largest |encoded value| one node can send: ceil(bound * 2**precision)."""
        return max(1, math.ceil(math.ldexp(float(self.bound), self.precision)))

    def max_error(self, contributors: int) -> float:
        """Worst absolute error of a decrypted sum of `contributors` values (before float64
        rounding of the result, which adds at most |result| * 2**-53)."""
        return contributors * math.ldexp(1.0, -(self.precision + 1))

    def layout(self, public_key: PaillierPublicKey) -> SlotLayout:
        """How values of this spec are packed under this key."""
        return SlotLayout.build(
            self.precision, self.max_abs_encoded, self.max_nodes, int(public_key.n).bit_length()
        )


@dataclass(frozen=True)
class SlotLayout:
    """Packing of one ciphertext vector: travels in the wire header and is re-derived and
    compared on receipt, so a sender cannot make slots overlap.

    Each slot holds sum(encoded + max_abs) over the contributors: at most
    max_nodes * 2 * max_abs, which fits in slot_bytes, so no slot can carry into the next.
    """

    precision: int
    max_abs: int
    max_nodes: int
    slot_bytes: int
    slots_per_ciphertext: int

    @classmethod
    def build(cls, precision: int, max_abs: int, max_nodes: int, modulus_bits: int) -> SlotLayout:
        slot_bits = (max_nodes * 2 * max_abs).bit_length()
        slot_bytes = (slot_bits + 7) // 8
        slots = (modulus_bits - 1) // (8 * slot_bytes)
        if slots < 1:
            raise SecureAggregationError("the key is too small for this SecureSumSpec")
        return cls(precision, max_abs, max_nodes, slot_bytes, slots)

    def ciphertexts_for(self, n_values: int) -> int:
        return -(-n_values // self.slots_per_ciphertext)


def _index_text(field: str, flat_index: int, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    if not shape:
        return field, ()
    index = tuple(int(i) for i in np.unravel_index(flat_index, shape))
    return f"{field}[{', '.join(map(str, index))}]", index


def _as_float_array(values: object, field: str) -> npt.NDArray[np.float64]:
    arr = np.asarray(values)
    if arr.dtype.kind not in "biufO":
        raise SecureAggregationError(f"{field}: expected numbers, got dtype {arr.dtype}")
    try:
        return arr.astype(np.float64)
    except (TypeError, ValueError, OverflowError):
        raise SecureAggregationError(f"{field}: expected real numbers") from None


def encode_fixed_point(
    values: object, spec: SecureSumSpec, *, field: str = "value"
) -> npt.NDArray[np.int64]:
    """round(values * 2**precision) as int64, same shape; refuses out-of-bound input.

    Checks every value before anything is encrypted, and names the field and index of the
    first bad one; the value itself is not in the message, because it is a node's data.
    """
    arr = _as_float_array(values, field)
    flat = arr.reshape(-1)
    shape = tuple(int(s) for s in arr.shape)
    bad = ~np.isfinite(flat)
    if bad.any():
        i = int(np.argmax(bad))
        where, index = _index_text(field, i, shape)
        kind = "NaN" if math.isnan(float(flat[i])) else "infinite"
        more = int(bad.sum()) - 1
        tail = f" ({more} more non-finite values)" if more else ""
        raise ValueOutOfBoundsError(
            f"{where} is {kind}; nothing was encrypted{tail}", field=field, index=index
        )
    over = np.abs(flat) > float(spec.bound)
    if over.any():
        i = int(np.argmax(over))
        where, index = _index_text(field, i, shape)
        more = int(over.sum()) - 1
        tail = f" ({more} more values beyond the bound)" if more else ""
        raise ValueOutOfBoundsError(
            f"{where} is outside the declared bound +-{spec.bound}; nothing was encrypted{tail}",
            field=field,
            index=index,
        )
    return np.rint(flat * spec.scale).astype(np.int64).reshape(arr.shape)


def _pack(biased: npt.NDArray[np.int64], layout: SlotLayout) -> list[int]:
    """Biased slot values (each in [0, 2*max_abs]) -> one big-endian integer per ciphertext."""
    slots, width = layout.slots_per_ciphertext, layout.slot_bytes
    n_ct = layout.ciphertexts_for(biased.size)
    padded = np.zeros(n_ct * slots, dtype=">u8")
    padded[: biased.size] = biased
    raw = padded.view(np.uint8).reshape(-1, 8)
    if width <= 8:
        raw = raw[:, 8 - width :]
    else:
        raw = np.concatenate([np.zeros((raw.shape[0], width - 8), np.uint8), raw], axis=1)
    buf = memoryview(np.ascontiguousarray(raw).tobytes())
    row = slots * width
    return [int.from_bytes(buf[i * row : (i + 1) * row], "big") for i in range(n_ct)]


def _unpack(
    plaintexts: Sequence[Mpz], layout: SlotLayout, n_values: int, contributors: int
) -> npt.NDArray[Any]:
    """Packed sums -> exact signed fixed-point sums (int64, or Python ints when wider).

    Every slot must lie in [0, contributors * 2 * max_abs] and padding slots must be 0;
    anything else cannot come from honest contributions and is refused.
    """
    slots, width = layout.slots_per_ciphertext, layout.slot_bytes
    row = slots * width
    limit = 1 << (8 * row)
    for i, m in enumerate(plaintexts):
        if m >= limit:
            raise AggregationOverflowError(
                f"ciphertext {i}: plaintext is wider than its {slots} slots; "
                "the sum overflowed or was tampered with"
            )
    buf = b"".join(int(m).to_bytes(row, "big") for m in plaintexts)
    raw = np.frombuffer(buf, dtype=np.uint8).reshape(-1, width)
    max_slot = contributors * 2 * layout.max_abs
    offset = contributors * layout.max_abs
    sums: npt.NDArray[Any]
    if width <= 8:
        wide = np.zeros((raw.shape[0], 8), dtype=np.uint8)
        wide[:, 8 - width :] = raw
        sums = wide.view(">u8").reshape(-1).astype(np.uint64)
        bad = sums[:n_values] > np.uint64(max_slot)
        padding_bad = sums[n_values:] != 0
    else:
        sums = np.array([int.from_bytes(r.tobytes(), "big") for r in raw], dtype=object)
        bad = np.array([s > max_slot for s in sums[:n_values]], dtype=bool)
        padding_bad = np.array([s != 0 for s in sums[n_values:]], dtype=bool)
    if bad.any():
        i = int(np.argmax(bad))
        raise AggregationOverflowError(
            f"slot {i} of the decrypted sum is outside the range {contributors} honest "
            f"contributions can produce ({int(bad.sum())} slots in all); refusing the sum"
        )
    if padding_bad.any():
        raise AggregationOverflowError(
            "a padding slot of the decrypted sum is not zero; the ciphertexts were tampered with"
        )
    values = sums[:n_values]
    if width <= 8 and max_slot < (1 << 63):
        return cast(npt.NDArray[Any], values.astype(np.int64) - np.int64(offset))
    return np.array([int(s) - offset for s in values], dtype=object)


# --------------------------------------------------------------------------- encryption


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_POOL_LOCK = threading.Lock()
_PROCESS_POOLS: dict[int, ProcessPoolExecutor] = {}


def _process_pool(workers: int) -> ProcessPoolExecutor:
    """A shared pool of `workers` processes, started on first use and kept for later calls.

    "spawn", not "fork": the federated layer runs broker and timer threads, and forking a
    threaded process can deadlock the child. The usual multiprocessing rule follows: a
    script that encrypts large vectors must guard its entry point with
    ``if __name__ == "__main__":``.
    """
    with _POOL_LOCK:
        pool = _PROCESS_POOLS.get(workers)
        if pool is None:
            pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn")
            )
            _PROCESS_POOLS[workers] = pool
            logger.debug("started %d Paillier worker processes", workers)
        return pool


def shutdown_workers() -> None:
    """Stop the worker processes (they are restarted on demand)."""
    with _POOL_LOCK:
        pools = list(_PROCESS_POOLS.values())
        _PROCESS_POOLS.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def _drop_pool(workers: int, pool: ProcessPoolExecutor) -> None:
    with _POOL_LOCK:
        if _PROCESS_POOLS.get(workers) is pool:
            del _PROCESS_POOLS[workers]
    pool.shutdown(wait=False, cancel_futures=True)


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
        self.workers = _available_cores() if workers is None else max(1, int(workers))
        self.parallel_threshold = max(1, int(parallel_threshold))
        self.key_id = key_id(self.public_key)
        self._n = gmpy2.mpz(int(self.public_key.n))
        self._nsquare = self._n * self._n
        self._width = (int(self._nsquare).bit_length() + 7) // 8
        self._source: pm.ObfuscatorSource | None = None
        self._lock = threading.Lock()
        self._pool: collections.deque[Mpz] = collections.deque()

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

    def precompute(self, n_ciphertexts: int) -> None:
        """Make n_ciphertexts obfuscators now for later encryptions (each used once)."""
        fresh = self._fresh(int(n_ciphertexts))
        with self._lock:
            self._pool.extend(fresh)

    @property
    def precomputed(self) -> int:
        """How many precomputed obfuscators are left."""
        return len(self._pool)

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
        pool = _process_pool(self.workers)
        n_chunks = max(1, min(self.workers * 4, count // 32))
        step = -(-count // n_chunks)
        sizes = [min(step, count - i) for i in range(0, count, step)]
        params = source.params()
        try:
            futures: list[Future[bytes]] = [
                pool.submit(pm.worker_obfuscators, source.kind, params, size, self._width)
                for size in sizes
            ]
            blobs = [f.result() for f in futures]
        except (BrokenProcessPool, OSError, RuntimeError) as exc:
            logger.warning(
                "Paillier worker processes failed (%s); encrypting in this process instead",
                type(exc).__name__,
            )
            _drop_pool(self.workers, pool)
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


# --------------------------------------------------------------------------- vectors

_MAGIC = b"FLPV"
_VERSION = 1
_HEADER = struct.Struct(">4sBB8sBBHIIQQIHB")
"""magic, version, flags, key id, precision, slot_bytes, slots per ciphertext, max_nodes,
contributors, max_abs, value count, ciphertext count, ciphertext bytes, ndim; then ndim
u64 dimensions, then the ciphertexts, each exactly the byte length of n**2, big-endian."""
_DIM = struct.Struct(">Q")


class EncryptedVector:
    """A packed, encrypted vector (or the encrypted sum of several) under one public key.

    Carries what the receiver needs to check it before use: the key id, the shape, the
    slot layout and how many contributions the sum holds. Adding refuses to go past the
    layout's max_nodes, since beyond that a slot could carry into its neighbour.

    The constructor trusts its arguments; bytes from anyone else go through from_bytes,
    which validates them.
    """

    __slots__ = ("ciphertexts", "contributors", "key_id", "layout", "public_key", "shape")

    def __init__(
        self,
        public_key: PaillierPublicKey,
        layout: SlotLayout,
        shape: tuple[int, ...],
        contributors: int,
        ciphertexts: list[Mpz],
    ) -> None:
        size = math.prod(shape)
        if len(ciphertexts) != layout.ciphertexts_for(size):
            raise SecureAggregationError(
                f"{len(ciphertexts)} ciphertexts do not hold {size} values in this layout"
            )
        if not 1 <= contributors <= layout.max_nodes:
            raise ContributorCountError(
                f"{contributors} contributors, but the layout allows 1 to {layout.max_nodes}"
            )
        self.public_key = public_key
        self.key_id = key_id(public_key)
        self.layout = layout
        self.shape = shape
        self.contributors = contributors
        self.ciphertexts = ciphertexts

    @property
    def size(self) -> int:
        """Number of values (product of the shape)."""
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return (
            f"<EncryptedVector key {self.key_id} shape={self.shape} "
            f"contributors={self.contributors} ciphertexts={len(self.ciphertexts)}>"
        )

    def _check_compatible(self, other: EncryptedVector) -> None:
        if other.key_id != self.key_id:
            raise KeyMismatchError(
                f"cannot add ciphertexts under key {other.key_id} to ones under key {self.key_id}"
            )
        if other.layout != self.layout:
            raise SpecMismatchError("cannot add vectors encoded with different SecureSumSpecs")
        if other.shape != self.shape:
            raise SpecMismatchError(f"cannot add shape {other.shape} to shape {self.shape}")

    def __add__(self, other: EncryptedVector) -> EncryptedVector:
        if not isinstance(other, EncryptedVector):
            return NotImplemented
        return EncryptedVector.sum([self, other])

    def __radd__(self, other: object) -> EncryptedVector:
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self  # so that the builtin sum() works
        return NotImplemented

    @classmethod
    def sum(cls, vectors: Iterable[EncryptedVector]) -> EncryptedVector:
        """The encrypted sum: one multiplication modulo n**2 per ciphertext per vector.

        Refuses (ContributorCountError) if the contributions would exceed max_nodes,
        rather than let slots wrap.
        """
        items = list(vectors)
        if not items:
            raise SecureAggregationError("cannot sum zero encrypted vectors")
        first = items[0]
        for other in items[1:]:
            first._check_compatible(other)
        total = sum(v.contributors for v in items)
        if total > first.layout.max_nodes:
            raise ContributorCountError(
                f"a sum of {total} contributions exceeds max_nodes={first.layout.max_nodes} "
                "declared in the SecureSumSpec; refusing rather than risk a silent overflow"
            )
        nsquare = gmpy2.mpz(int(first.public_key.nsquare))
        acc = list(first.ciphertexts)
        for other in items[1:]:
            acc = [a * b % nsquare for a, b in zip(acc, other.ciphertexts, strict=True)]
        return cls(first.public_key, first.layout, first.shape, total, acc)

    def to_bytes(self) -> bytes:
        """Compact wire form: a small header and fixed-width big-endian ciphertexts."""
        width = (int(self.public_key.nsquare).bit_length() + 7) // 8
        layout = self.layout
        header = _HEADER.pack(
            _MAGIC,
            _VERSION,
            0,
            bytes.fromhex(self.key_id),
            layout.precision,
            layout.slot_bytes,
            layout.slots_per_ciphertext,
            layout.max_nodes,
            self.contributors,
            layout.max_abs,
            self.size,
            len(self.ciphertexts),
            width,
            len(self.shape),
        )
        dims = b"".join(_DIM.pack(d) for d in self.shape)
        return header + dims + b"".join(int(c).to_bytes(width, "big") for c in self.ciphertexts)

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, public_key: PaillierPublicKey
    ) -> EncryptedVector:
        """Parse and validate bytes from the wire; every failure is a WireFormatError
        (KeyMismatchError for another key) that says what was wrong.

        Checks magic, version, key id, layout consistency, counts, exact length, and every
        ciphertext: 0 < c < n**2 and gcd(c, n) = 1.
        """
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise WireFormatError(
                f"ciphertext vector truncated: {len(data)} bytes, header alone is {_HEADER.size}"
            )
        (
            magic,
            version,
            flags,
            kid,
            precision,
            slot_bytes,
            slots,
            max_nodes,
            contributors,
            max_abs,
            n_values,
            n_ct,
            width,
            ndim,
        ) = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise WireFormatError("not a flame ciphertext vector (bad magic bytes)")
        if version != _VERSION:
            raise WireFormatError(f"unsupported ciphertext vector version {version}")
        if flags != 0:
            raise WireFormatError("unsupported ciphertext vector flags")
        expected_kid = key_id(public_key)
        if kid.hex() != expected_kid:
            raise KeyMismatchError(
                f"ciphertext vector is under key {kid.hex()}, expected key {expected_kid}"
            )
        n = gmpy2.mpz(int(public_key.n))
        nsquare = n * n
        expected_width = (int(nsquare).bit_length() + 7) // 8
        if width != expected_width:
            raise WireFormatError(
                f"ciphertext width {width} bytes does not match the key ({expected_width})"
            )
        if ndim > _MAX_NDIM:
            raise WireFormatError(f"too many dimensions ({ndim})")
        if not (
            0 <= precision <= _MAX_PRECISION
            and 1 <= max_abs < _MAX_ABS_ENCODED
            and 1 <= max_nodes <= _MAX_NODES
        ):
            raise WireFormatError("slot layout parameters out of range")
        try:
            layout = SlotLayout.build(precision, max_abs, max_nodes, int(n).bit_length())
        except SecureAggregationError:
            raise WireFormatError("slot layout does not fit this key") from None
        if (slot_bytes, slots) != (layout.slot_bytes, layout.slots_per_ciphertext):
            raise WireFormatError("slot layout in the header is inconsistent")
        if not 1 <= contributors <= max_nodes:
            raise WireFormatError(
                f"contributor count {contributors} outside 1..max_nodes={max_nodes}"
            )
        dims_end = _HEADER.size + _DIM.size * ndim
        if len(data) < dims_end:
            raise WireFormatError("ciphertext vector truncated inside the shape")
        shape = tuple(_DIM.unpack_from(data, _HEADER.size + _DIM.size * i)[0] for i in range(ndim))
        if math.prod(shape) != n_values:
            raise WireFormatError(f"shape {shape} does not hold {n_values} values")
        if n_ct != layout.ciphertexts_for(n_values):
            raise WireFormatError(
                f"{n_ct} ciphertexts cannot hold {n_values} values "
                f"({layout.slots_per_ciphertext} per ciphertext)"
            )
        expected_len = dims_end + n_ct * width
        if len(data) != expected_len:
            what = "truncated" if len(data) < expected_len else "has trailing bytes"
            raise WireFormatError(
                f"ciphertext vector {what}: {len(data)} bytes, expected {expected_len}"
            )
        ciphertexts = [
            gmpy2.mpz(
                int.from_bytes(data[dims_end + i * width : dims_end + (i + 1) * width], "big")
            )
            for i in range(n_ct)
        ]
        _check_ciphertexts(ciphertexts, n, nsquare)
        return cls(public_key, layout, shape, contributors, ciphertexts)


def _check_ciphertexts(ciphertexts: Sequence[Mpz], n: Mpz, nsquare: Mpz) -> None:
    """0 < c < n**2 and gcd(c, n) = 1 for all; gcd once, on the product mod n (a prime
    factor of n divides the product iff it divides some c)."""
    product = gmpy2.mpz(1)
    for i, c in enumerate(ciphertexts):
        if not 0 < c < nsquare:
            raise WireFormatError(
                f"ciphertext {i} of {len(ciphertexts)} is out of range (need 0 < c < n^2)"
            )
        product = product * c % n
    if gmpy2.gcd(product, n) != 1:
        for i, c in enumerate(ciphertexts):
            if gmpy2.gcd(c, n) != 1:
                raise WireFormatError(
                    f"ciphertext {i} of {len(ciphertexts)} is not invertible modulo n "
                    "(gcd(c, n) != 1); it cannot be a Paillier ciphertext"
                )


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
            f"at least {min_contributors} are required"
        )


def _decrypt_ciphertexts(
    ciphertexts: Sequence[Mpz], private_key: PaillierPrivateKey, workers: int | None
) -> list[Mpz]:
    threads = _available_cores() if workers is None else max(1, workers)
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
    _check_ciphertexts(cs, n, n * n)
    decryptor = pm.CrtDecryptor(int(n), int(private_key.p), int(private_key.q))
    return [int(m) for m in decryptor.decrypt(cs)]

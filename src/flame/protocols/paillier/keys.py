"""Single-key Paillier keys: generation, key ids, phe-compatible JWK files.

The single-key mode is for ``flame simulate --secure`` and small trusted set-ups: every
analysis node holds the whole private key. Threshold keys live in ``threshold.py``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import gmpy2
from phe.paillier import PaillierPrivateKey, PaillierPublicKey

from flame.protocols.paillier import _math as pm
from flame.protocols.paillier.errors import InsecureKeyError, KeyFileError, SecureAggregationError

__all__ = [
    "MIN_KEY_BITS",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "write_keypair",
]

logger = logging.getLogger(__name__)

MIN_KEY_BITS = 2048
"""Smallest modulus accepted without ``allow_insecure`` (about 112-bit security)."""

_MAX_KEY_BITS = 16384
_MAX_KEY_FILE_BYTES = 1 << 20


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


def refuse_shared_secret(path: Path, what: str) -> None:
    """Refuse a secret file that group or others may access, as ssh does: a warning is read
    too late, after the key may already have been copied."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # it was just read; a vanished file is not a permission problem
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path}: {what} is accessible to other users (mode {stat.S_IMODE(mode):04o}); "
            f"a secret must be private: chmod 600 {path}"
        )


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
    refuse_shared_secret(path, "private key file")
    return PaillierPrivateKey(public_key, p, q)

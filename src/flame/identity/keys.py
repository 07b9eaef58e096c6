"""Node identities: an Ed25519 signing key per node, and the file hygiene around it.

A private key file readable by group or others is refused (as ssh does): a key that others
could have copied no longer identifies one node. The public half travels as text,
`ed25519:<base64 of the 32 raw bytes>`, which is what the roster lists.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from flame.errors import ConfigError

__all__ = [
    "Identity",
    "check_private_file",
    "parse_public_key",
    "public_key_text",
    "write_identity",
]

PUBLIC_PREFIX = "ed25519:"


def public_key_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PUBLIC_PREFIX + base64.b64encode(raw).decode()


def parse_public_key(text: str, what: str = "public key") -> Ed25519PublicKey:
    """`ed25519:<base64>` -> key; ConfigError naming `what` if it is anything else."""
    if not isinstance(text, str) or not text.startswith(PUBLIC_PREFIX):
        raise ConfigError(f"{what}: must start with {PUBLIC_PREFIX!r} (an Ed25519 public key)")
    try:
        raw = base64.b64decode(text[len(PUBLIC_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{what}: is not valid base64") from None
    if len(raw) != 32:
        raise ConfigError(f"{what}: an Ed25519 public key has 32 bytes, this one {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def check_private_file(path: Path, what: str) -> None:
    """Refuse a secret file that group or others may read or write (ConfigError, with the fix)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{what}: {path} is not a regular file")
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(
            f"{what}: {path} is accessible by group/others (mode {stat.S_IMODE(mode):04o}); "
            f"a private key must be private: chmod 600 {path}"
        )


@dataclass(frozen=True)
class Identity:
    """This node's id and signing key. Never logged, never sent; only its signatures are."""

    node_id: str
    key: Ed25519PrivateKey

    @classmethod
    def generate(cls, node_id: str) -> Identity:
        return cls(node_id, Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, node_id: str, path: Path) -> Identity:
        """Read a key file written by `flame keys identity` (PEM PKCS#8), refusing loose modes."""
        what = "FLAME_IDENTITY__KEY_FILE / identity.key_file"
        check_private_file(path, what)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError, OSError):
            raise ConfigError(f"{what}: {path} is not an unencrypted PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{what}: {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(node_id, key)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.key.public_key()

    @property
    def public_text(self) -> str:
        return public_key_text(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)

    def __repr__(self) -> str:  # the key never appears in a log line or traceback
        return f"Identity({self.node_id!r}, {self.public_text})"


def write_identity(identity: Identity, directory: Path) -> tuple[Path, Path]:
    """`DIR/NODE.key` (0600, PEM) and `DIR/NODE.pub` (the roster's text); never overwrites."""
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / f"{identity.node_id}.key"
    public = directory / f"{identity.node_id}.pub"
    for path in (private, public):
        if path.exists():
            raise ConfigError(f"{path} already exists; refusing to overwrite an identity")
    pem = identity.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public.write_text(identity.public_text + "\n")
    return private, public

"""X25519 key agreement: the pairwise mask keys, and the keys that seal Shamir shares.

Every node makes two fresh X25519 key pairs per session: `c` seals the shares it sends to
each other node (ChaCha20-Poly1305, so the server that relays them can neither read nor
alter them) and `s` agrees the pairwise mask seed with each other node. Both are run
through HKDF with the session binding and the two node ids, so no key serves two sessions,
two pairs or two purposes.
"""

from __future__ import annotations

import functools
import hashlib

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from flame.protocols.masking.errors import ProtocolViolation
from flame.protocols.masking.prg import derive_key

__all__ = [
    "KEY_BYTES",
    "check_point",
    "open_share",
    "pair_mask_key",
    "private_raw",
    "public_raw",
    "seal_share",
    "share_key",
]

KEY_BYTES = 32


def public_raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _exchange(private: X25519PrivateKey, public: bytes, what: str) -> bytes:
    if len(public) != KEY_BYTES:
        raise ProtocolViolation(f"{what}: an X25519 public key has {KEY_BYTES} bytes")
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise ProtocolViolation(f"{what}: a degenerate X25519 public key") from None


def check_point(public: bytes, what: str) -> None:
    """ProtocolViolation if `public` is no usable X25519 key (wrong length, or a low-order
    point such as all zeros: `cryptography` refuses an exchange with one), tried with a
    throwaway key, so the aggregator can refuse what every node would refuse."""
    _exchange(_probe(), public, what)


@functools.cache
def _probe() -> X25519PrivateKey:
    """One throwaway key per process for `check_point` (its exchanges are discarded)."""
    return X25519PrivateKey.generate()


def _pair(a: str, b: str) -> bytes:
    low, high = sorted((a, b))
    return f"{low}\0{high}".encode()


def pair_mask_key(
    private: X25519PrivateKey, peer_public: bytes, context: bytes, me: str, peer: str
) -> bytes:
    """The ChaCha20 key of the pairwise mask between `me` and `peer` (the same on both)."""
    secret = _exchange(private, peer_public, f"pairwise key with {peer!r}")
    return derive_key(secret, b"flame-masking-pair-v1", context + b"\0" + _pair(me, peer))


def share_key(
    private: X25519PrivateKey, peer_public: bytes, context: bytes, me: str, peer: str
) -> bytes:
    """The ChaCha20-Poly1305 key sealing shares between `me` and `peer`, either way (the same
    on both; a node that seals to a peer and later opens the peer's shares makes it once)."""
    secret = _exchange(private, peer_public, f"share key of {me!r} and {peer!r}")
    return derive_key(secret, b"flame-masking-share-v1", context + b"\0" + _pair(me, peer))


def _share_cipher(
    key: bytes, context: bytes, sender: str, recipient: str
) -> tuple[ChaCha20Poly1305, bytes, bytes]:
    direction = f"{sender}\0{recipient}".encode()
    nonce = hashlib.sha256(b"flame-masking-share-nonce\0" + direction).digest()[:12]
    return ChaCha20Poly1305(key), nonce, context + b"\0" + direction


def seal_share(
    private: X25519PrivateKey | bytes,
    peer_public: bytes,
    context: bytes,
    sender: str,
    recipient: str,
    plaintext: bytes,
) -> bytes:
    """`plaintext` sealed from `sender` to `recipient` (one message per direction and session:
    the key is fresh per session, the nonce fixed by the direction). `private` may be the
    pair's `share_key` instead of the sender's private key."""
    key = (
        private
        if isinstance(private, bytes)
        else share_key(private, peer_public, context, sender, recipient)
    )
    aead, nonce, aad = _share_cipher(key, context, sender, recipient)
    return aead.encrypt(nonce, plaintext, aad)


def open_share(
    private: X25519PrivateKey | bytes,
    peer_public: bytes,
    context: bytes,
    sender: str,
    recipient: str,
    sealed: bytes,
) -> bytes:
    key = (
        private
        if isinstance(private, bytes)
        else share_key(private, peer_public, context, recipient, sender)
    )
    aead, nonce, aad = _share_cipher(key, context, sender, recipient)
    try:
        return aead.decrypt(nonce, sealed, aad)
    except InvalidTag:
        raise ProtocolViolation(
            f"the shares {sender!r} sent to {recipient!r} do not open: altered or misaddressed"
        ) from None

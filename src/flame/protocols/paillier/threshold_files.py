"""Files of a threshold key: public_key.json (phe-readable, plus the threshold part) and one
share-<node>.json (mode 0600) per share holder.

public_key.json is an ordinary phe/flame public key file with an extra "threshold" object
(T, members with share index and verification key, the verification base v), so
`load_public_key` and phe read it as a plain Paillier public key for encryption.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flame.protocols.paillier.errors import KeyFileError, SecureAggregationError
from flame.protocols.paillier.keys import (
    _b64url,
    _b64url_to_int,
    _check_key_bits,
    _public_jwk,
    _read_jwk,
    _write_file,
    refuse_shared_secret,
)
from flame.protocols.paillier.threshold import ThresholdKeyShare, ThresholdPublicKey

__all__ = [
    "load_key_share",
    "load_threshold_public_key",
    "share_file_name",
    "write_threshold_key",
]

logger = logging.getLogger(__name__)

SCHEME = "damgard-jurik-s1"


def share_file_name(node_id: str) -> str:
    return f"share-{node_id}.json"


def _public_dict(public: ThresholdPublicKey) -> dict[str, Any]:
    jwk = _public_jwk(public.paillier)
    jwk["threshold"] = {
        "scheme": SCHEME,
        "t": public.threshold,
        "v": _b64url(public.v),
        "members": [
            {"id": node, "index": index, "verification": _b64url(public.verification[index - 1])}
            for node, index in public.members
        ],
    }
    return jwk


def write_threshold_key(
    out_dir: Path,
    public: ThresholdPublicKey,
    shares: list[ThresholdKeyShare],
    *,
    overwrite: bool = False,
) -> tuple[Path, list[Path]]:
    """public_key.json (0644) and share-<node>.json (0600) for every share, atomically each."""
    out_dir = Path(out_dir)
    public_path = out_dir / "public_key.json"
    share_paths = [out_dir / share_file_name(s.node_id) for s in shares]
    if not overwrite:
        for path in (public_path, *share_paths):
            if path.exists():
                raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    public_jwk = _public_dict(public)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for share, path in zip(shares, share_paths, strict=True):
            body = {
                "kty": "DAJ",
                "key_ops": ["partial-decrypt"],
                "kid": public_jwk["kid"],
                "node": share.node_id,
                "index": share.index,
                "share": _b64url(share.secret),
                "pub": public_jwk,
            }
            _write_file(path, json.dumps(body) + "\n", 0o600)
        _write_file(public_path, json.dumps(public_jwk) + "\n", 0o644)
    except OSError as exc:
        raise KeyFileError(f"cannot write the threshold key to {out_dir}: {exc.strerror}") from None
    return public_path, share_paths


def _threshold_from(data: dict[str, Any], path: Path, allow_insecure: bool) -> ThresholdPublicKey:
    n = _b64url_to_int(data.get("n"), path, "n")
    _check_key_bits(n.bit_length(), allow_insecure, str(path))
    part = data.get("threshold")
    if not isinstance(part, dict) or part.get("scheme") != SCHEME:
        raise KeyFileError(f"{path}: not a threshold public key (no 'threshold' of {SCHEME})")
    members = part.get("members")
    t = part.get("t")
    if not isinstance(members, list) or not isinstance(t, int) or isinstance(t, bool):
        raise KeyFileError(f"{path}: 'threshold' needs 't' and 'members'")
    pairs: list[tuple[str, int]] = []
    verification: dict[int, int] = {}
    for k, entry in enumerate(members):
        if not isinstance(entry, dict):
            raise KeyFileError(f"{path}: threshold member #{k + 1} must be an object")
        node, index = entry.get("id"), entry.get("index")
        if not isinstance(node, str) or not isinstance(index, int) or isinstance(index, bool):
            raise KeyFileError(f"{path}: threshold member #{k + 1} needs 'id' and 'index'")
        pairs.append((node, index))
        verification[index] = _b64url_to_int(entry.get("verification"), path, "verification")
    try:
        return ThresholdPublicKey(
            n=n,
            threshold=t,
            members=tuple(pairs),
            v=_b64url_to_int(part.get("v"), path, "v"),
            verification=tuple(verification.get(i, 0) for i in range(1, len(pairs) + 1)),
        )
    except SecureAggregationError as exc:
        raise KeyFileError(f"{path}: {exc}") from None


def load_threshold_public_key(path: Path, *, allow_insecure: bool = False) -> ThresholdPublicKey:
    """Read public_key.json of a threshold key (refuses a file holding a share)."""
    path = Path(path)
    data = _read_jwk(path, "threshold public key")
    if "share" in data or "p" in data:
        raise KeyFileError(f"{path}: holds secret key material where a public key was expected")
    return _threshold_from(data, path, allow_insecure)


def load_key_share(
    path: Path, *, node_id: str | None = None, allow_insecure: bool = False
) -> ThresholdKeyShare:
    """Read share-<node>.json and check it against its verification key (and node_id)."""
    path = Path(path)
    data = _read_jwk(path, "key share")
    if "partial-decrypt" not in data["key_ops"]:
        raise KeyFileError(f"{path}: not a key share file (key_ops lacks 'partial-decrypt')")
    pub = data.get("pub")
    if not isinstance(pub, dict):
        raise KeyFileError(f"{path}: not a key share file (missing 'pub')")
    public = _threshold_from(pub, path, allow_insecure)
    node, index = data.get("node"), data.get("index")
    if not isinstance(node, str) or not isinstance(index, int) or isinstance(index, bool):
        raise KeyFileError(f"{path}: key share needs 'node' and 'index'")
    if node_id is not None and node != node_id:
        raise KeyFileError(f"{path}: this share belongs to {node!r}, not to {node_id!r}")
    try:
        share = ThresholdKeyShare(
            public, node, index, _b64url_to_int(data.get("share"), path, "share")
        )
    except SecureAggregationError as exc:
        raise KeyFileError(f"{path}: {exc}") from None
    refuse_shared_secret(path, "key share file")
    return share

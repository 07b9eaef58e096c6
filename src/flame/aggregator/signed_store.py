"""Signed run-store records: what the aggregator stores and later acts on is its own.

With the claim check every node holds the credentials of the store the aggregator keeps its
checkpoints and final manifest in, so a node could plant a "finished run" (issue 21, red team
B4). The aggregator therefore signs each JSON record it will act on again (the final manifest,
with the result's SHA-256 and the code hash; each checkpoint, with its aggregate's SHA-256)
with its Ed25519 identity, and verifies the signature against the roster before using a
record. The signature is over `b"flame-store-v1\\0" + analysis + b"\\0" + key + b"\\0" +
the record without "sig" as canonical JSON`, so a record cannot be moved to another key or
analysis. The bytes a record names are then checked against its SHA-256.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature

from flame.errors import ConfigError
from flame.wire.envelope import to_jsonable

if TYPE_CHECKING:
    from flame.identity.keys import Identity
    from flame.identity.roster import Roster

__all__ = ["check_sha256", "sign_record", "verify_record"]

_CONTEXT = b"flame-store-v1\0"


def _message(analysis_id: str, key: str, body: dict[str, Any]) -> bytes:
    canonical = json.dumps(to_jsonable(body), sort_keys=True, separators=(",", ":"))
    return _CONTEXT + f"{analysis_id}\0{key}\0".encode() + canonical.encode()


def sign_record(
    identity: Identity, analysis_id: str, key: str, record: dict[str, Any]
) -> dict[str, Any]:
    """`record` as stored (JSON-normalised) with the aggregator's `"sig"`."""
    body = json.loads(json.dumps(to_jsonable({k: v for k, v in record.items() if k != "sig"})))
    signature = identity.sign(_message(analysis_id, key, body))
    return {**body, "sig": base64.b64encode(signature).decode()}


def verify_record(
    roster: Roster, aggregator_id: str, analysis_id: str, key: str, record: Any
) -> dict[str, Any]:
    """The record, if the roster's aggregator `aggregator_id` signed it for this key; else a
    ConfigError naming the object (a forged or foreign record is never acted on)."""
    where = f"storage object {key!r}"
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: not a JSON object; not acting on it")
    member = roster.get(aggregator_id)
    if member is None or member.role != "aggregation":
        raise ConfigError(f"{where}: {aggregator_id!r} is not the roster's aggregator")
    text = record.get("sig")
    try:
        signature = base64.b64decode(str(text), validate=True)
        body = {k: v for k, v in record.items() if k != "sig"}
        member.public_key.verify(signature, _message(analysis_id, key, body))
    except (binascii.Error, ValueError, InvalidSignature):
        raise ConfigError(
            f"{where}: not signed by the aggregator {aggregator_id!r} (planted or altered by "
            "someone with the storage credentials); not acting on it: remove "
            f"{key.rsplit('/', 2)[0]}/ from storage or use a new analysis id"
        ) from None
    return record


def check_sha256(key: str, data: bytes, expected: Any) -> None:
    """Refuse bytes whose SHA-256 is not the one their (verified) record names."""
    if not isinstance(expected, str) or hashlib.sha256(data).hexdigest() != expected:
        raise ConfigError(
            f"storage object {key!r}: its SHA-256 is not the one its manifest names "
            "(altered or replaced); not using it"
        )

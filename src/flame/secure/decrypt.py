"""The decrypting node's side of single-key Paillier sums in unsigned runs: the reporter
decrypts the aggregator's encrypted sums, the confirmers check its report against them
(signed runs: `flame.secure.single_key`, which reuses `answer_vectors`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from flame.errors import FlameError
from flame.wire.envelope import Envelope, Sealed

if TYPE_CHECKING:
    from flame.protocols.paillier import EncryptedVector
    from flame.secure.keys import SecureKeys

__all__ = ["DECRYPT", "DECRYPTED", "answer_decrypt", "answer_vectors"]

DECRYPT = "flame.secure.decrypt"
DECRYPTED = "flame.secure.decrypted"


def answer_decrypt(
    envelope: Envelope,
    keys: SecureKeys,
    node_id: str,
    specs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Unsigned runs only (signed ones: `flame.secure.single_key`): decrypt the aggregator's
    encrypted sums (as the reporter), or check the reporter's plaintext against them (as a
    confirmer); refuse sums of too few contributors.

    `specs` are the encodings this node used per field when it sealed its result (see
    `seal`); fields not in it are read with the configured spec."""
    from flame.protocols.paillier import EncryptedVector

    body = envelope.body if isinstance(envelope.body, dict) else {}
    sums = body.get("sums")
    contributors = body.get("contributors")
    if not isinstance(sums, dict) or not isinstance(contributors, dict):
        return {"error": "malformed decryption request"}
    vectors: dict[str, EncryptedVector] = {}
    try:
        for path, sealed in sums.items():
            who = contributors.get(path)
            if not isinstance(sealed, Sealed) or not isinstance(who, list):
                return {"error": f"malformed decryption request for {path!r}"}
            if node_id not in who:
                return {"error": f"asked to decrypt {path!r}, to which this node did not add"}
            vector = EncryptedVector.from_bytes(sealed.data, keys.public_key)
            if vector.contributors != len(who):
                return {
                    "error": f"{path!r} holds {vector.contributors} contributions, "
                    f"the request names {len(who)}"
                }
            vectors[path] = vector
    except FlameError as exc:
        return {"error": str(exc)}
    return answer_vectors(body, vectors, keys, specs)


def answer_vectors(
    body: dict[str, Any],
    vectors: dict[str, EncryptedVector],
    keys: SecureKeys,
    specs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The reporter's decrypted sums of `vectors` ({"sums": ...}), or a confirmer's check of
    the reported ones in `body` ({"confirmed": n}); {"error": why} otherwise."""
    from flame.protocols.paillier import decrypt_vector, verify_reported_sum

    assert keys.private_key is not None
    reported = body.get("reported")
    fraction = body.get("fraction", 1.0)
    if reported is not None and not isinstance(reported, dict):
        return {"error": "malformed decryption request (reported sums)"}
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        return {"error": "malformed decryption request (fraction)"}
    plain: dict[str, np.ndarray] = {}
    checked = 0
    try:
        for path, vector in vectors.items():
            spec = (specs or {}).get(path, keys.spec)
            if reported is None:
                plain[path] = decrypt_vector(
                    vector, keys.private_key, spec, min_contributors=keys.min_contributors
                )
            else:
                checked += verify_reported_sum(
                    vector,
                    keys.private_key,
                    spec,
                    reported.get(path),
                    min_contributors=keys.min_contributors,
                    fraction=float(fraction),
                )
    except FlameError as exc:
        return {"error": str(exc)}
    if reported is None:
        return {"sums": plain}
    return {"confirmed": checked}

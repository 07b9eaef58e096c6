"""Single key: every contributor endorses a field's contribution set before anyone decrypts.

Why: each single-key node's differencing guard is its own. Without this round a malicious
aggregator asked node-0 for the sum over {0, 1, 2} and node-1 (whose ledger was empty) for
the sum over {1, 2} of the same field and epoch: the difference is node-0's value. Now a
decrypter (reporter or confirmer) needs the signed endorsement of *every* contributor of
the set it is asked to sum, and a node endorses at most one set per (analysis, epoch,
field), only the set fixed for the analysis (unless FLAME_SECURE__ALLOW_CHANGING_
CONTRIBUTORS), recorded in its ledger before the endorsement leaves. Two different sets that
share a node therefore never both get decrypted; disjoint sets reveal nothing about each
other. The round carries digests only.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Any

from flame.errors import FlameError
from flame.secure.contributions import Verifier
from flame.secure.endorse import set_digest

__all__ = ["endorsement_message", "pairs_of", "check_endorsed", "parse_digests"]

Pairs = tuple[tuple[str, bytes], ...]
_LEN = struct.Struct(">I")


def endorsement_message(key: str, analysis: str, epoch: int, path: str, pairs: Pairs) -> bytes:
    """What a single-key node signs: this key, run, epoch and field may be summed over this
    set of signed contributions."""
    parts = (key, analysis, str(epoch), path)
    framed = b"".join(_LEN.pack(len(p.encode())) + p.encode() for p in parts)
    return b"flame-single-key-endorsement-v1\0" + framed + set_digest(pairs)


def pairs_of(contributions: Mapping[str, Any]) -> Pairs:
    """(node, SHA-256 of its whole signed contribution) for each contributor, sorted."""
    return tuple(
        (str(node), hashlib.sha256(bytes(sealed.data)).digest())
        for node, sealed in sorted(contributions.items())
    )


def parse_digests(body: Any) -> dict[str, Pairs]:
    """{field: pairs} of an endorsement request; FlameError if malformed."""
    digests = body.get("digests") if isinstance(body, dict) else None
    if not isinstance(digests, dict) or not digests:
        raise FlameError("malformed endorsement request (digests)")
    fields: dict[str, Pairs] = {}
    for path, by_node in digests.items():
        if not isinstance(path, str) or not isinstance(by_node, dict) or not by_node:
            raise FlameError("malformed endorsement request (digests)")
        pairs = []
        for node, text in sorted(by_node.items()):
            if not isinstance(node, str) or not isinstance(text, str) or len(text) != 64:
                raise FlameError(f"malformed endorsement request for {path!r}")
            try:
                pairs.append((node, bytes.fromhex(text)))
            except ValueError:
                raise FlameError(f"malformed endorsement request for {path!r}") from None
        fields[path] = tuple(pairs)
    return fields


def check_endorsed(
    verify: Verifier,
    key: str,
    analysis: str,
    epoch: int,
    path: str,
    pairs: Pairs,
    endorsements: Any,
) -> None:
    """FlameError unless every contributor of `pairs` signed this very set."""
    if not isinstance(endorsements, dict):
        raise FlameError(
            f"the request to decrypt {path!r} carries no endorsements: every contributor must "
            "endorse the contribution set first"
        )
    message = endorsement_message(key, analysis, epoch, path, pairs)
    for node, _ in pairs:
        text = endorsements.get(node)
        try:
            signature = bytes.fromhex(text) if isinstance(text, str) else None
        except ValueError:
            signature = None
        problem = "none given" if signature is None else verify(node, message, signature)
        if problem is not None:
            raise FlameError(
                f"no valid endorsement of {node!r} for the contribution set of {path!r} "
                f"({problem}): every contributor must endorse the set it is summed over"
            )

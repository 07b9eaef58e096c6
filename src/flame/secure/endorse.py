"""Endorsement quorum: one contribution set per (analysis, epoch, field) across all holders.

A share holder's differencing guard and "decrypt once" are its own: with 2T <= n two
disjoint groups of T holders could each decrypt a different sum of one field, and even with
T > n/2 the holders two groups share may be the malicious ones. So before any partial
decryption the aggregator asks every share holder to *endorse* a field's contribution set
(contributor, SHA-256 of its signed vector, its signature: digests only, a tiny round). A
holder endorses at most one set per (analysis, epoch, field), recorded in its persisted
guard ledger before the endorsement is released, and signs it with its roster identity. A
holder decrypts only with Q = ceil((n + T) / 2) valid endorsements of exactly the set it is
asked to sum. Two sets of Q holders share at least 2Q - n >= T holders, so at least one
honest holder (at most T - 1 are malicious) endorsed both: it never does, so no two
different sums of a field are ever decryptable. The price: up to n - Q holders may be
missing when endorsing (n - T when decrypting).
"""

from __future__ import annotations

import hashlib
import logging
import math
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flame.errors import FlameError, RunFailed
from flame.protocols.paillier.errors import MIN_CONTRIBUTORS_FIX
from flame.utils.deadline import Deadline
from flame.wire.envelope import Envelope, Sealed

if TYPE_CHECKING:
    from flame.node.context import Context
    from flame.protocols.paillier.threshold import ThresholdPublicKey
    from flame.secure.contributions import Verifier

__all__ = [
    "ENDORSE",
    "ENDORSED",
    "Pairs",
    "check_decryption_endorsed",
    "check_endorse_request",
    "collect_endorsements",
    "contribution_pairs",
    "endorsement_message",
    "is_text",
    "parse_endorse_request",
    "quorum_size",
    "set_digest",
    "valid_endorsers",
]

log = logging.getLogger(__name__)

ENDORSE = "flame.secure.endorse"
ENDORSED = "flame.secure.endorsed"

Pairs = tuple[tuple[str, bytes], ...]
"""(contributor node, SHA-256 of its signed vector), sorted by node."""

_LEN = struct.Struct(">I")


def quorum_size(public: ThresholdPublicKey) -> int:
    """Q = ceil((n + T) / 2): any two sets of Q of the n holders share >= T holders."""
    return math.ceil((public.parties + public.threshold) / 2)


def _framed(*parts: bytes) -> bytes:
    return b"".join(_LEN.pack(len(p)) + p for p in parts)


def set_digest(pairs: Pairs) -> bytes:
    """One digest for a contribution set (length-framed: no two sets encode alike)."""
    return hashlib.sha256(
        b"flame-contribution-set-v1" + b"".join(_framed(n.encode(), d) for n, d in sorted(pairs))
    ).digest()


def endorsement_message(
    public: ThresholdPublicKey, analysis: str, epoch: int, path: str, pairs: Pairs
) -> bytes:
    """What a holder signs: this key, run, epoch and field may be decrypted over this set."""
    return b"flame-endorsement-v1\0" + _framed(
        public.key_id.encode(),
        analysis.encode(),
        str(epoch).encode(),
        path.encode(),
        set_digest(pairs),
    )


def contribution_pairs(path: str, contributions: Mapping[str, Any]) -> Pairs:
    """The (node, digest of proof and vector) pairs of signed contributions (FlameError if
    malformed): an endorsed set fixes the proofs too."""
    from flame.secure.contributions import check_scheme, unpack_contribution

    pairs = []
    for node, sealed in sorted(contributions.items()):
        check_scheme(node, path, sealed)
        _, data = unpack_contribution(bytes(sealed.data))
        pairs.append((node, hashlib.sha256(data).digest()))
    return tuple(pairs)


def is_text(value: Any) -> bool:
    """A str that encodes as UTF-8: JSON on the wire carries lone surrogates, which would
    make every signed message raise UnicodeEncodeError (and kill the holder's loop)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _hex(value: Any, size: int | None = None) -> bytes | None:
    if not isinstance(value, str) or len(value) > 2048:
        return None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return None
    return raw if size is None or len(raw) == size else None


def parse_endorse_request(body: Any) -> dict[str, tuple[Pairs, dict[str, bytes]]]:
    """{field: ((node, digest) pairs, {node: contribution signature})} of a request."""
    fields = body.get("endorse") if isinstance(body, dict) else None
    if not isinstance(fields, dict) or not fields:
        raise FlameError("malformed endorsement request")
    parsed = {}
    for path, entries in fields.items():
        if not is_text(path) or not isinstance(entries, list):
            raise FlameError("malformed endorsement request")
        pairs: dict[str, bytes] = {}
        signatures: dict[str, bytes] = {}
        for entry in entries:
            if not isinstance(entry, list) or len(entry) != 3 or not is_text(entry[0]):
                raise FlameError(f"malformed endorsement request for {path!r}")
            node, digest, signature = entry[0], _hex(entry[1], 32), _hex(entry[2])
            if digest is None or signature is None or node in pairs:
                raise FlameError(f"malformed endorsement request for {path!r} ({node!r})")
            pairs[node], signatures[node] = digest, signature
        parsed[path] = (tuple(sorted(pairs.items())), signatures)
    return parsed


def check_endorse_request(
    verify: Verifier,
    min_contributors: int,
    analysis: str,
    epoch: int,
    path: str,
    pairs: Pairs,
    signatures: Mapping[str, bytes],
) -> None:
    """What a holder checks before endorsing a set: enough distinct contributors, no vector
    sent twice, and every contributor's signature over its digest (FlameError if not)."""
    from flame.secure.contributions import contribution_digest_message

    if len(pairs) < min_contributors:
        raise FlameError(
            f"refusing to endorse {path!r}: a set of {len(pairs)} contribution(s); at least "
            f"{min_contributors} distinct nodes are required{MIN_CONTRIBUTORS_FIX}"
        )
    if len({digest for _, digest in pairs}) != len(pairs):
        raise FlameError(f"refusing to endorse {path!r}: two contributions are the same vector")
    for node, digest in pairs:
        message = contribution_digest_message(analysis, epoch, path, node, digest)
        problem = verify(node, message, signatures[node])
        if problem is not None:
            raise FlameError(f"the contribution of {node!r} to {path!r}: {problem}")


def valid_endorsers(
    public: ThresholdPublicKey,
    verify: Verifier,
    message: bytes,
    endorsements: Any,
) -> tuple[list[str], list[str]]:
    """(distinct share holders whose endorsement of `message` is valid, why others are not).

    Only roster members holding a share of this key count, once each: the aggregator's or a
    non-holder's signature, or a second one from the same holder, adds nothing. Only a
    holder's first entry is checked, so a request cannot stall a holder with many."""
    holders = {node for node, _ in public.members}
    valid: list[str] = []
    ignored: list[str] = []
    tried: set[str] = set()
    for entry in endorsements if isinstance(endorsements, list) else []:
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str):
            if len(ignored) < 20:
                ignored.append("a malformed entry")
            continue
        node, signature = entry[0], _hex(entry[1])
        if node in tried:
            if len(ignored) < 20:
                ignored.append(f"{node}: a duplicate")
        elif node not in holders:
            if len(ignored) < 20:
                ignored.append(f"{node[:64]}: holds no share of this key")
        elif signature is None:
            tried.add(node)
            ignored.append(f"{node}: a malformed signature")
        else:
            tried.add(node)
            problem = verify(node, message, signature)
            if problem is None:
                valid.append(node)
            else:
                ignored.append(f"{node}: {problem}")
    return valid, ignored


def collect_endorsements(
    public: ThresholdPublicKey,
    context: Context,
    verify: Verifier,
    epoch: int,
    fields: Mapping[str, Mapping[str, Sealed]],
    timeout: float,
) -> tuple[dict[str, list[list[str]]], list[str]]:
    """Ask every share holder to endorse each field's contribution set; wait for Q valid
    endorsements of every field (RunFailed naming Q, who endorsed and who did not).
    Returns the endorsements per field for the decryption request, and the holders that
    refused (or sent an invalid endorsement): they would refuse to decrypt too."""
    from flame.secure.contributions import unpack_contribution

    analysis = context.analysis_id
    q = quorum_size(public)
    pairs = {path: contribution_pairs(path, by_node) for path, by_node in fields.items()}
    messages = {
        path: endorsement_message(public, analysis, epoch, path, p) for path, p in pairs.items()
    }
    request = {
        path: [
            [node, digest.hex(), unpack_contribution(bytes(fields[path][node].data))[0].hex()]
            for node, digest in p
        ]
        for path, p in pairs.items()
    }
    holders = [node for node, _ in public.members if node in context.participants]
    log.info(
        "epoch %d: asking %d share holders to endorse the contribution sets of %s (Q = %d of %d)",
        epoch,
        len(holders),
        ", ".join(repr(p) for p in fields),
        q,
        public.parties,
    )
    transport = context._mailbox.transport
    for node in holders:
        transport.send(
            Envelope(
                analysis,
                context.node_id,
                node,
                "message",
                epoch,
                {"threshold": 1, "endorse": request},
                ENDORSE,
            )
        )
    got: dict[str, dict[str, str]] = {path: {} for path in fields}
    refusals: dict[str, str] = {}
    answered: set[str] = set()
    deadline = Deadline(timeout)

    def wanted(envelope: Envelope) -> bool:
        return (
            envelope.kind == "message"
            and envelope.category == ENDORSED
            and envelope.sender in holders
            and envelope.sender not in answered
            and envelope.epoch == epoch
        )

    while len(answered) < len(holders) and any(len(g) < q for g in got.values()):
        envelope = context._mailbox.next(wanted, deadline)
        if envelope is None:
            break
        node = envelope.sender
        answered.add(node)
        reply = envelope.body if isinstance(envelope.body, dict) else {}
        given = reply.get("endorsements")
        if "error" in reply or not isinstance(given, dict):
            refusals[node] = str(reply.get("error", "malformed reply"))[:300]
            log.warning("epoch %d: %s refused to endorse: %s", epoch, node, refusals[node])
            continue
        for path, message in messages.items():
            valid, ignored = valid_endorsers(public, verify, message, [[node, given.get(path)]])
            if valid:
                got[path][node] = str(given[path])
            else:
                refusals[node] = f"no valid endorsement of {path!r} ({'; '.join(ignored)})"
                log.warning("epoch %d: %s: %s", epoch, node, refusals[node])
    short = [path for path, g in got.items() if len(g) < q]
    if short:
        path = short[0]
        endorsers = sorted(got[path])
        missing = [n for n in holders if n not in answered]
        absent = [n for n, _ in public.members if n not in holders]
        parts = [
            f"{len(endorsers)} of {public.parties} share holders endorsed the contribution set "
            f"of {path!r}; Q = {q} are needed before any holder decrypts (T = "
            f"{public.threshold}): endorsed by {', '.join(endorsers) or 'nobody'}"
        ]
        if refusals:
            parts.append("; ".join(f"{n}: {r}" for n, r in sorted(refusals.items())))
        if missing:
            parts.append(f"no answer within {timeout:g} s from {', '.join(missing)}")
        if absent:
            parts.append(f"not in the run: {', '.join(absent)}")
        raise RunFailed(f"epoch {epoch}: endorsement failed: " + " | ".join(parts), epoch=epoch)
    endorsers = sorted(set.intersection(*(set(g) for g in got.values())))
    log.info(
        "epoch %d: contribution sets endorsed by %s (Q = %d of %d)",
        epoch,
        ", ".join(endorsers),
        q,
        public.parties,
    )
    return {path: [[n, s] for n, s in sorted(g.items())] for path, g in got.items()}, sorted(
        refusals
    )


def check_decryption_endorsed(
    public: ThresholdPublicKey,
    verify: Verifier,
    analysis: str,
    epoch: int,
    path: str,
    pairs: Pairs,
    endorsements: Any,
) -> None:
    """FlameError unless Q distinct share holders endorsed exactly this contribution set."""
    message = endorsement_message(public, analysis, epoch, path, pairs)
    valid, ignored = valid_endorsers(public, verify, message, endorsements)
    q = quorum_size(public)
    if len(valid) < q:
        why = f" (not counted: {'; '.join(ignored)[:400]})" if ignored else ""
        raise FlameError(
            f"refusing to decrypt {path!r}: {len(valid)} valid endorsement(s) of this "
            f"contribution set from distinct share holders, {q} needed{why}"
        )

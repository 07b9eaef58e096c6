"""Threshold decryption inside a run: no single party can decrypt, any T share holders do.

Analysis nodes send each encrypted field with a proof that they know its plaintexts
(`plaintext_proof`: a vector derived from other nodes' ciphertexts cannot cancel them) and
sign it (`threshold_contributions`; Ed25519, their roster identity) over (analysis, epoch,
field, node, SHA-256 of proof and vector). For each secure field the aggregator first asks
every share holder to endorse the field's contribution set (digests and signatures only,
`threshold_endorse`): a
holder (`ThresholdParty.endorse`) checks the signatures against the roster,
`min_contributors`, and the differencing guard (the set equals the one fixed by the
analysis's first sum), and endorses at most one set per (analysis, epoch, field). Then the
aggregator forwards every signed contribution with Q = ceil((n + T) / 2) endorsements to
the holders. A holder (`ThresholdParty.answer`) decrypts only a set endorsed by Q distinct
holders, checks the contributions again, that no ciphertext was copied between them, every
proof of plaintext knowledge, the guard, and that it has not decrypted another sum for
this (analysis, epoch, field) -- all kept in its node-local state, so a restart does not
forget them (`threshold_ledger`); then it adds the contributions itself and returns its
partial decryption with a proof. The aggregator (`ThresholdCollector`) checks every proof,
names a holder whose partial is wrong, and combines the first T valid ones:
up to n - Q holders may be missing when endorsing and n - T when decrypting.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flame.errors import FlameError, RunFailed
from flame.protocols.paillier.errors import MIN_CONTRIBUTORS_FIX
from flame.secure.contributions import Signer, Verifier, sum_contributions
from flame.secure.guard import GuardLedger, NodeLocalState
from flame.utils.deadline import Deadline
from flame.wire.envelope import Envelope, Sealed

if TYPE_CHECKING:
    from flame.node.context import Context
    from flame.protocols.paillier import EncryptedVector
    from flame.protocols.paillier.threshold import ThresholdKeyShare, ThresholdPublicKey

__all__ = [
    "PARTIAL",
    "ThresholdCollector",
    "ThresholdParty",
    "differencing_problem",
    "request_context",
]

log = logging.getLogger(__name__)

PARTIAL = "paillier-partial"


def request_context(
    analysis: str, epoch: int, path: str, contributors: Sequence[str], total: bytes
) -> bytes:
    """What a partial decryption's proof is bound to: run, epoch, field, who, which sum."""
    h = hashlib.sha256(b"flame-threshold-request-v1\0")
    for part in (analysis, str(epoch), path, ",".join(sorted(contributors))):
        h.update(part.encode() + b"\0")
    h.update(hashlib.sha256(total).digest())
    return h.digest()


def _own_first(
    fixed: Mapping[str, tuple[str, ...]], path: str
) -> list[tuple[str, tuple[str, ...]]]:
    """The fixed sets to check a sum of `path` against: its own field's first, then the rest."""
    return sorted(fixed.items(), key=lambda item: (item[0] != path, item[0]))


def differencing_problem(path: str, fixed: Sequence[str], now: Sequence[str]) -> str | None:
    """Why a sum over `now` must not be decrypted after one over `fixed`, or None."""
    missing = sorted(set(fixed) - set(now))
    new = sorted(set(now) - set(fixed))
    if not missing and not new:
        return None
    what = "; ".join(
        text
        for text in (
            f"missing {', '.join(missing)}" if missing else "",
            f"new {', '.join(new)}" if new else "",
        )
        if text
    )
    return (
        f"the contributor set of {path!r} is fixed by its first sum ({', '.join(fixed)}); "
        f"this sum differs ({what}). Decrypting it would reveal a difference of sums "
        "(FLAME_SECURE__ALLOW_CHANGING_CONTRIBUTORS=true lifts this guard)"
    )


@dataclass
class ThresholdParty:
    """A share holder's side: endorses at most one contribution set per field and epoch,
    and decrypts (at most once) only a set that Q share holders endorsed."""

    share: ThresholdKeyShare
    verify: Verifier | None
    min_contributors: int
    allow_changing_contributors: bool = False
    state: NodeLocalState | None = None
    """This node's node-local state: the guard ledger is kept there, so a restarted holder
    still refuses a differing sum (None: memory only)."""
    sign: Signer | None = None
    """Signs endorsements with this node's roster identity (None: unsigned run)."""
    _ledger: GuardLedger = field(init=False)
    _answers: dict[tuple[str, int, str], tuple[bytes, bytes]] = field(default_factory=dict)
    _endorsements: dict[tuple[str, int, str], tuple[bytes, bytes]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _warned: bool = False

    def __post_init__(self) -> None:
        self._ledger = GuardLedger(self.share, self.state)

    def endorse(self, envelope: Envelope) -> dict[str, Any]:
        """Sign that a field's contribution set may be decrypted: at most one set per
        (analysis, epoch, field), recorded in the ledger before the endorsement leaves."""
        from flame.secure.endorse import parse_endorse_request

        try:
            fields = parse_endorse_request(envelope.body)
            if self.verify is None or self.sign is None:
                raise FlameError(
                    "cannot endorse in an unsigned run (no roster identity to sign with)"
                )
            return {
                "endorsements": {
                    path: self._endorse(envelope.analysis, envelope.epoch, path, *request).hex()
                    for path, request in fields.items()
                }
            }
        except FlameError as exc:
            return {"error": str(exc)}
        except Exception as exc:  # a holder answers any request with an error, never dies
            log.warning("refused a malformed endorsement request (%s)", type(exc).__name__)
            return {"error": f"malformed endorsement request ({type(exc).__name__})"}

    def _endorse(
        self,
        analysis: str,
        epoch: int,
        path: str,
        pairs: tuple[tuple[str, bytes], ...],
        signatures: dict[str, bytes],
    ) -> bytes:
        from flame.secure.endorse import (
            check_endorse_request,
            endorsement_message,
            set_digest,
        )

        assert self.verify is not None and self.sign is not None
        who = tuple(node for node, _ in pairs)
        check_endorse_request(
            self.verify, self.min_contributors, analysis, epoch, path, pairs, signatures
        )
        digest = set_digest(pairs)
        with self._lock:
            self._guard(analysis, path, who, "endorse")
            done = self._ledger.endorsed(analysis, epoch, path)
            if done is None and self._ledger.answered(analysis, epoch, path) is not None:
                raise FlameError(  # a ledger from before endorsements: which set is unknown
                    f"refusing to endorse: this node already decrypted a sum of {path!r} in "
                    f"epoch {epoch}"
                )
            if done is not None and done != digest:
                raise FlameError(
                    f"refusing to endorse: this node already endorsed (or decrypted) a different "
                    f"contribution set of {path!r} in epoch {epoch} (one set per field and epoch)"
                )
            cached = self._endorsements.get((analysis, epoch, path))
            if cached is not None and cached[0] == digest:
                return cached[1]  # the same set again: the same answer
            signature = self.sign(
                endorsement_message(self.share.public, analysis, epoch, path, pairs)
            )
            if done is None:  # recorded (and persisted) before the endorsement is released
                self._ledger.endorse(analysis, epoch, path, who, digest)
            self._endorsements[(analysis, epoch, path)] = (digest, signature)
        log.info("epoch %d: endorsed the %d contributions to %r", epoch, len(who), path)
        return signature

    def _guard(self, analysis: str, path: str, who: tuple[str, ...], what: str) -> None:
        """The differencing guard: FlameError if `who` differs from the set fixed by the first
        sum of this field or of any other field of the analysis (an analysis may send the same
        values twice, say 'total' and 'check': two sets over them difference out a node)."""
        if self.allow_changing_contributors:
            return
        for first, fixed in _own_first(self._ledger.fixed_sets(analysis), path):
            problem = differencing_problem(first, fixed, who)
            if problem is not None:
                where = "" if first == path else f" ({path!r})"
                raise FlameError(f"refusing to {what}{where}: {problem}")

    def answer(self, envelope: Envelope) -> dict[str, Any]:
        """Partial decryptions of every field of a request, or {"error": why not}."""
        try:
            return self._answer(envelope)
        except FlameError as exc:
            return {"error": str(exc)}
        except Exception as exc:  # a holder answers any request with an error, never dies
            log.warning("refused a malformed decryption request (%s)", type(exc).__name__)
            return {"error": f"malformed threshold decryption request ({type(exc).__name__})"}

    def _answer(self, envelope: Envelope) -> dict[str, Any]:
        from flame.secure.endorse import is_text

        body = envelope.body if isinstance(envelope.body, dict) else {}
        fields = body.get("fields")
        endorsements = body.get("endorsements")
        if not isinstance(fields, dict) or not fields:
            return {"error": "malformed threshold decryption request"}
        if not isinstance(endorsements, dict):
            endorsements = {}
        partials: dict[str, Sealed] = {}
        try:
            for path, contributions in fields.items():
                if (
                    not is_text(path)
                    or not isinstance(contributions, dict)
                    or not all(is_text(node) for node in contributions)
                ):
                    return {"error": "malformed threshold decryption request"}
                partials[path] = self._field(
                    envelope.analysis, envelope.epoch, path, contributions, endorsements.get(path)
                )
        except FlameError as exc:
            return {"error": str(exc)}
        return {"partials": partials}

    def _field(
        self,
        analysis: str,
        epoch: int,
        path: str,
        contributions: dict[str, Any],
        endorsements: Any = None,
    ) -> Sealed:
        from flame.protocols.paillier.threshold import partial_decrypt
        from flame.secure.endorse import (
            check_decryption_endorsed,
            contribution_pairs,
            set_digest,
        )

        public = self.share.public
        who = tuple(sorted(contributions))
        if len(who) < self.min_contributors:
            raise FlameError(
                f"refusing to decrypt {path!r}: a sum of {len(who)} contribution(s); at least "
                f"{self.min_contributors} distinct nodes are required{MIN_CONTRIBUTORS_FIX}"
            )
        pairs = contribution_pairs(path, contributions)
        with self._lock:  # this holder's own rules first: they name what is wrong best
            self._guard(analysis, path, who, "decrypt")
            own = self._ledger.endorsed(analysis, epoch, path)
        if own is not None and own != set_digest(pairs):
            raise FlameError(
                f"refusing to decrypt: this node endorsed (or decrypted) a different "
                f"contribution set of {path!r} in epoch {epoch}"
            )
        if self.verify is None:
            if not self._warned:
                self._warned = True
                log.warning(
                    "decrypting without checking contributors' signatures or endorsements "
                    "(unsigned run)"
                )
        else:  # Q holders endorsed exactly these vectors (their digests): no other set of
            # this field can be endorsed by Q, so no second sum is ever decrypted
            check_decryption_endorsed(
                public, self.verify, analysis, epoch, path, pairs, endorsements
            )
        total = sum_contributions(public, analysis, epoch, path, contributions, self.verify)
        total_bytes = total.to_bytes()
        with self._lock:
            self._guard(analysis, path, who, "decrypt")
            done = self._ledger.answered(analysis, epoch, path)
            digest = hashlib.sha256(total_bytes).digest()
            if done is not None and done != digest:
                raise FlameError(
                    f"refusing to decrypt: this node already decrypted a different sum "
                    f"of {path!r} in epoch {epoch} (a replayed or changed request)"
                )
            cached = self._answers.get((analysis, epoch, path))
            if cached is not None and cached[0] == digest:
                return Sealed(PARTIAL, cached[1])  # the same request again: the same answer
            context = request_context(analysis, epoch, path, who, total_bytes)
            partial = partial_decrypt(self.share, total.ciphertexts, context)
            data = partial.to_bytes(public)
            if done is None:  # recorded (and persisted) before the partial is released
                self._ledger.record(analysis, epoch, path, who, digest, set_digest(pairs))
            self._answers[(analysis, epoch, path)] = (digest, data)
        log.info("epoch %d: partial decryption of %r over %d contributions", epoch, path, len(who))
        return Sealed(PARTIAL, data)


@dataclass
class ThresholdCollector:
    """The aggregator's side: ask every share holder, combine the first T valid answers."""

    public: ThresholdPublicKey
    context: Context
    timeout: float
    allow_changing_contributors: bool = False
    request_category: str = "flame.secure.decrypt"
    reply_category: str = "flame.secure.decrypted"
    decrypters: int | None = None
    """How many holders to ask at first (None: all); more are asked on refusal or delay."""
    stall: float | None = None
    """Seconds without an answer before asking the remaining holders (default timeout / 4)."""
    verify: Verifier | None = None
    """Checks the holders' endorsements (None: unsigned run, no endorsement round)."""
    invalid: list[str] = field(default_factory=list)
    _fixed: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def decrypt(
        self, epoch: int, fields: dict[str, dict[str, Sealed]], totals: dict[str, EncryptedVector]
    ) -> dict[str, list[Any]]:
        """Plaintext slot integers (packed) per field, from T verified partial decryptions."""
        from flame.protocols.paillier.threshold import (
            InvalidPartialError,
            PartialDecryption,
            _combine,
            verify_partial,
        )

        analysis = self.context.analysis_id
        for path, by_node in fields.items():
            who = tuple(sorted(by_node))
            for fixed_by, fixed in _own_first(self._fixed, path):  # the guard spans fields
                problem = differencing_problem(fixed_by, fixed, who)
                if problem is not None and not self.allow_changing_contributors:
                    where = "" if fixed_by == path else f" ({path!r})"
                    raise RunFailed(f"epoch {epoch}{where}: {problem}", epoch=epoch)
        contexts = {
            path: request_context(analysis, epoch, path, list(by_node), totals[path].to_bytes())
            for path, by_node in fields.items()
        }
        holders = [node for node, _ in self.public.members if node in self.context.participants]
        endorsements: dict[str, list[list[str]]] = {}
        if self.verify is not None:  # Q holders fix this epoch's sets before anyone decrypts
            from flame.secure.endorse import collect_endorsements

            endorsements, refused = collect_endorsements(
                self.public, self.context, self.verify, epoch, fields, self.timeout
            )
            holders.sort(key=lambda node: node in refused)  # refusers asked last (stable)
        request = {"threshold": 1, "fields": fields, "endorsements": endorsements}
        transport = self.context._mailbox.transport
        asked: list[str] = []

        def ask(count: int) -> None:
            fresh = [n for n in holders if n not in asked][: max(0, count)]
            if not fresh:
                return
            log.info(
                "epoch %d: asking %d share holders to decrypt %s (any %d suffice): %s",
                epoch,
                len(fresh),
                ", ".join(repr(p) for p in fields),
                self.public.threshold,
                ", ".join(fresh),
            )
            for node in fresh:
                asked.append(node)
                transport.send(
                    Envelope(
                        analysis,
                        self.context.node_id,
                        node,
                        "message",
                        epoch,
                        request,
                        self.request_category,
                    )
                )

        first = len(holders) if self.decrypters is None else max(self.decrypters, 1)
        ask(max(first, self.public.threshold))
        valid: dict[str, dict[int, Any]] = {path: {} for path in fields}
        refusals: dict[str, str] = {}
        answered: set[str] = set()
        deadline = Deadline(self.timeout)

        def wanted(envelope: Envelope) -> bool:
            return (
                envelope.kind == "message"
                and envelope.category == self.reply_category
                and envelope.sender in asked
                and envelope.sender not in answered
                and envelope.epoch == epoch
            )

        t = self.public.threshold
        stall = self.timeout / 4 if self.stall is None else self.stall
        while any(len(v) < t for v in valid.values()):
            wait = Deadline(min(deadline.left(), stall)) if len(asked) < len(holders) else deadline
            envelope = self.context._mailbox.next(wanted, wait)
            if envelope is None:
                if deadline.passed() or len(asked) == len(holders):
                    break
                log.warning(
                    "epoch %d: no decryption from %s within %g s; asking the other holders",
                    epoch,
                    ", ".join(n for n in asked if n not in answered) or "anyone",
                    stall,
                )
                ask(len(holders))
                continue
            node = envelope.sender
            answered.add(node)
            reply = envelope.body if isinstance(envelope.body, dict) else {}
            if "error" in reply:
                refusals[node] = str(reply["error"])[:300]
                log.warning("epoch %d: %s refused to decrypt: %s", epoch, node, refusals[node])
                ask(1)
                continue
            partials = reply.get("partials")
            if not isinstance(partials, dict):
                refusals[node] = "malformed reply"
                ask(1)
                continue
            for path in fields:
                sealed = partials.get(path)
                if len(valid[path]) >= t:
                    continue
                try:
                    if not isinstance(sealed, Sealed) or sealed.scheme != PARTIAL:
                        raise FlameError("no partial decryption for this field")
                    partial = PartialDecryption.from_bytes(bytes(sealed.data), self.public)
                    if self.public.node_of(partial.index) != node:
                        raise FlameError(f"it sent share {partial.index}, which is not its own")
                    verify_partial(self.public, totals[path].ciphertexts, partial, contexts[path])
                except (InvalidPartialError, FlameError) as exc:
                    self.invalid.append(node)
                    log.warning(
                        "epoch %d: node %s sent a wrong partial decryption of %r (%s); "
                        "it is ignored",
                        epoch,
                        node,
                        path,
                        exc,
                    )
                    refusals[node] = f"wrong partial decryption of {path!r}: {exc}"
                    ask(1)
                    continue
                valid[path][partial.index] = partial
        short = [path for path, v in valid.items() if len(v) < t]
        if short:
            missing = [n for n in asked if n not in answered]
            parts = [
                f"{len(valid[short[0]])} valid partial decryption(s) of {short[0]!r}, {t} needed"
            ]
            if refusals:
                parts.append("; ".join(f"{n}: {r}" for n, r in sorted(refusals.items())))
            if missing:
                parts.append(f"no answer within {self.timeout:g} s from {', '.join(missing)}")
            raise RunFailed(
                f"epoch {epoch}: threshold decryption failed: " + " | ".join(parts), epoch=epoch
            )
        for path, by_node in fields.items():
            self._fixed.setdefault(path, tuple(sorted(by_node)))
            log.info(
                "epoch %d: %r decrypted with the partial decryptions of %s",
                epoch,
                path,
                ", ".join(self.public.node_of(i) for i in sorted(valid[path])),
            )
        import gmpy2

        return {
            path: _combine(
                self.public, [gmpy2.mpz(c) for c in totals[path].ciphertexts], valid[path]
            )
            for path in fields
        }

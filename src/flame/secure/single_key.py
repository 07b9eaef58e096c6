"""Single-key decryption with the threshold mode's cheap guarantees.

With one private key on every analysis node, a key holder can decrypt anything it is given,
so what it is given is checked first (the checks threshold share holders make):
* every node signs its contribution (scheme `SIGNED`: the roster identity's signature over
  analysis, epoch, field, node and the vector's SHA-256, as in `flame.secure.contributions`);
* a decrypter (reporter or confirmer) never decrypts the aggregator's sum: it re-adds the
  signed contributions of the request, each holding exactly one node's vector, among them its
  own as it sent it, so a lone ciphertext relabelled as a sum is refused;
* the differencing guard: a field's contributor set is fixed by its first endorsed or
  decrypted sum, for every field of the analysis (FLAME_SECURE__ALLOW_CHANGING_CONTRIBUTORS
  lifts it), and one sum per (epoch, field) is decrypted; the ledger is kept in node-local
  state, like a share holder's, so a restart does not forget it;
* every contributor of a set endorses it before anyone decrypts it (`flame.secure.
  unanimous`): the guards of all contributors, not only the decrypter's, hold.
What this cannot change: any one key holder can decrypt every node's ciphertexts it sees on
the wire or receives; threshold mode is the production mode.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flame.errors import FlameError
from flame.secure.contributions import (
    SIGNED,
    InvalidContributionError,
    Verifier,
    contribution_message,
    sign_contribution,
    unpack_contribution,
)
from flame.secure.endorse import set_digest
from flame.secure.guard import GuardLedger, NodeLocalState
from flame.secure.threshold import _own_first, differencing_problem
from flame.secure.unanimous import (
    Pairs,
    check_endorsed,
    endorsement_message,
    pairs_of,
    parse_digests,
)
from flame.wire.envelope import Envelope, Sealed

if TYPE_CHECKING:
    from phe.paillier import PaillierPublicKey

    from flame.protocols.paillier import EncryptedVector
    from flame.secure.keys import SecureKeys

__all__ = ["SIGNED", "SingleKeyDecrypter", "add_signed", "sign_contribution"]

log = logging.getLogger(__name__)


TAG = "flame-single-key-guard"
"""The node-state tag of a single-key decrypter's ledger."""


def open_signed(
    public: PaillierPublicKey,
    analysis: str,
    epoch: int,
    path: str,
    node: str,
    sealed: Any,
    verify: Verifier | None,
) -> EncryptedVector:
    """The one vector `node` signed for this field and epoch; FlameError says what is wrong."""
    from flame.protocols.paillier import EncryptedVector

    if not isinstance(sealed, Sealed) or sealed.scheme != SIGNED:
        raise FlameError(f"the contribution of {node!r} to {path!r} is not a signed one")
    signature, body = unpack_contribution(bytes(sealed.data))
    if verify is not None:
        problem = verify(node, contribution_message(analysis, epoch, path, node, body), signature)
        if problem is not None:
            raise FlameError(f"the contribution of {node!r} to {path!r}: {problem}")
    vector = EncryptedVector.from_bytes(body, public)
    if vector.contributors != 1:
        raise FlameError(
            f"the contribution of {node!r} to {path!r} claims to hold {vector.contributors} "
            "contributions; one node sends one"
        )
    return vector


def add_signed(
    public: PaillierPublicKey,
    analysis: str,
    epoch: int,
    path: str,
    contributions: Mapping[str, Any],
    verify: Verifier | None,
) -> EncryptedVector:
    """Check every signed contribution and add them (no ciphertext may appear twice)."""
    from flame.protocols.paillier import EncryptedVector

    vectors = []
    seen: set[int] = set()
    for node, sealed in sorted(contributions.items()):
        try:
            vector = open_signed(public, analysis, epoch, path, node, sealed, verify)
        except InvalidContributionError:
            raise
        except FlameError as exc:
            raise InvalidContributionError(str(exc), node) from None
        for c in vector.ciphertexts:
            if int(c) in seen:
                raise InvalidContributionError(
                    f"the contribution of {node!r} to {path!r} repeats a ciphertext of "
                    "another contribution",
                    node,
                )
            seen.add(int(c))
        vectors.append(vector)
    if not vectors:
        raise FlameError(f"no contributions to {path!r}")
    return EncryptedVector.sum(vectors)


def _digest(data: Any) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


@dataclass
class SingleKeyDecrypter:
    """A single-key analysis node's answers to decryption requests (see the module)."""

    keys: SecureKeys
    node_id: str
    analysis_id: str
    members: frozenset[str] | None
    """The roster's analysis members (None: an unsigned run, no roster)."""
    state: NodeLocalState | None = None
    _epoch: int = -1
    _specs: dict[str, Any] = field(default_factory=dict)
    _sent: dict[str, str] = field(default_factory=dict)  # field -> digest of own contribution
    _ledger: GuardLedger | None = None

    def sent(self, epoch: int, body: Any, specs: Mapping[str, Any]) -> None:
        """This node sent `body` (its sealed result) for `epoch`: only that epoch is
        decrypted, and only sums that hold these very contributions."""
        from flame.secure.marked import _walk

        self._epoch, self._specs = epoch, dict(specs)
        self._sent = {
            path: _digest(value.data)
            for path, value in _walk(body)
            if isinstance(value, Sealed) and value.scheme == SIGNED
        }

    def answer(self, envelope: Envelope) -> dict[str, Any]:
        """{"sums"} or {"confirmed"} for the aggregator's request, or {"error": why not}."""
        if envelope.epoch != self._epoch:
            return {"error": f"no result of this node in epoch {envelope.epoch}"}
        body = envelope.body if isinstance(envelope.body, dict) else {}
        try:
            if "contributions" in body:
                return self._signed(envelope.epoch, body)
            if self.keys.signer is not None:
                return {
                    "error": "this node decrypts only sums it re-adds from signed "
                    "contributions (a sum alone may be one node's ciphertext relabelled)"
                }
            return self._unsigned(envelope, body)
        except FlameError as exc:
            return {"error": str(exc)}

    def _signed(self, epoch: int, body: dict[str, Any]) -> dict[str, Any]:
        from flame.secure.decrypt import answer_vectors

        fields = body.get("contributions")
        if not isinstance(fields, dict) or not fields:
            return {"error": "malformed decryption request (contributions)"}
        vectors: dict[str, EncryptedVector] = {}
        sets: dict[str, tuple[str, ...]] = {}
        for path, by_node in fields.items():
            if not isinstance(path, str) or not isinstance(by_node, dict):
                return {"error": "malformed decryption request (contributions)"}
            own = by_node.get(self.node_id)
            if own is None or path not in self._sent:
                return {"error": f"asked to decrypt {path!r}, to which this node did not add"}
            if not isinstance(own, Sealed) or _digest(own.data) != self._sent[path]:
                return {
                    "error": f"the request's contribution of this node to {path!r} is not the "
                    "one it sent"
                }
            who = tuple(sorted(str(n) for n in by_node))
            problem = self._strangers(path, who)
            if problem is not None:
                return {"error": problem}
            if self.keys.verifier is None:
                return {"error": "cannot check contributions without a roster (unsigned run)"}
            endorsements = body.get("endorsements")
            check_endorsed(
                self.keys.verifier,
                self._key_id(),
                self.analysis_id,
                epoch,
                path,
                pairs_of(by_node),
                endorsements.get(path) if isinstance(endorsements, dict) else None,
            )
            vectors[path] = add_signed(
                self.keys.public_key,
                self.analysis_id,
                epoch,
                path,
                by_node,
                self.keys.verifier,
            )
            sets[path] = who
        self._guard(epoch, vectors, sets)  # recorded before anything is released
        return answer_vectors(body, vectors, self.keys, self._specs)

    def endorse(self, envelope: Envelope) -> dict[str, Any]:
        """{"endorsements": {field: signature hex}} for the aggregator's endorsement request
        (see `flame.secure.unanimous`), or {"error": why not}."""
        if envelope.epoch != self._epoch:
            return {"error": f"no result of this node in epoch {envelope.epoch}"}
        if self.keys.signer is None:
            return {"error": "cannot endorse in an unsigned run (no roster identity)"}
        try:
            fields = parse_digests(envelope.body)
            return {"endorsements": self._endorse(envelope.epoch, fields)}
        except FlameError as exc:
            return {"error": str(exc)}

    def _endorse(self, epoch: int, fields: dict[str, Pairs]) -> dict[str, str]:
        assert self.keys.signer is not None
        ledger = self._guard_ledger()
        analysis = self.analysis_id
        fixed = dict(ledger.fixed_sets(analysis))
        digests: dict[str, bytes] = {}
        for path, pairs in fields.items():
            who = tuple(node for node, _ in pairs)
            own = dict(pairs).get(self.node_id)
            if own is None or path not in self._sent:
                raise FlameError(f"asked to endorse {path!r}, to which this node did not add")
            if own.hex() != self._sent[path]:
                raise FlameError(
                    f"the set of {path!r} holds a contribution of this node other than the "
                    "one it sent"
                )
            problem = self._strangers(path, who)
            if problem is not None:
                raise FlameError(problem)
            if len(who) < self.keys.min_contributors:
                raise FlameError(
                    f"refusing to endorse {path!r}: {len(who)} contributors, a sum needs at "
                    f"least {self.keys.min_contributors} (FLAME_SECURE__MIN_CONTRIBUTORS)"
                )
            digests[path] = set_digest(pairs)
            done = ledger.endorsed(analysis, epoch, path)
            if done is not None and done != digests[path]:
                raise FlameError(
                    f"refusing to endorse: this node endorsed a different contribution set "
                    f"of {path!r} in epoch {epoch}"
                )
            if not self.keys.allow_changing_contributors:
                for first, earlier in _own_first(fixed, path):  # the guard spans fields
                    problem = differencing_problem(first, earlier, who)
                    if problem is not None:
                        where = "" if first == path else f" ({path!r})"
                        raise FlameError(f"refusing to endorse{where}: {problem}")
                fixed.setdefault(path, who)
        signed = {}
        for path, pairs in fields.items():  # recorded (persisted) before anything leaves
            who = tuple(node for node, _ in pairs)
            ledger.endorse(analysis, epoch, path, who, digests[path])
            message = endorsement_message(self._key_id(), analysis, epoch, path, pairs)
            signed[path] = self.keys.signer(message).hex()
        return signed

    def _key_id(self) -> str:
        from flame.protocols.paillier.keys import key_id

        return key_id(self.keys.public_key)

    def _unsigned(self, envelope: Envelope, body: dict[str, Any]) -> dict[str, Any]:
        """An unsigned run (nothing is authenticated there): the aggregator's sums, with the
        contributor-set guard over the names it gives."""
        from flame.protocols.paillier import EncryptedVector
        from flame.secure.decrypt import answer_decrypt

        sums, who = body.get("sums"), body.get("contributors")
        if not isinstance(sums, dict) or not isinstance(who, dict):
            return answer_decrypt(envelope, self.keys, self.node_id, self._specs)
        vectors: dict[str, EncryptedVector] = {}
        sets: dict[str, tuple[str, ...]] = {}
        for path, names in who.items():
            if path not in sums:
                continue
            if not isinstance(names, list) or len(set(map(str, names))) != len(names):
                return {"error": f"the contributors of {path!r} are not a list of distinct nodes"}
            sealed = sums[path]
            if not isinstance(sealed, Sealed):
                return {"error": f"malformed decryption request for {path!r}"}
            sets[path] = tuple(sorted(map(str, names)))
            vectors[path] = EncryptedVector.from_bytes(sealed.data, self.keys.public_key)
        reply = answer_decrypt(envelope, self.keys, self.node_id, self._specs)
        if "error" not in reply:
            self._guard(envelope.epoch, vectors, sets)
        return reply

    def _strangers(self, path: str, who: tuple[str, ...]) -> str | None:
        if self.members is None:
            return None
        strangers = [n for n in who if n not in self.members]
        if not strangers:
            return None
        return (
            f"contributors of {path!r} are not analysis members of the roster: "
            f"{', '.join(strangers)}"
        )

    def _guard(
        self,
        epoch: int,
        vectors: Mapping[str, EncryptedVector],
        sets: Mapping[str, tuple[str, ...]],
    ) -> None:
        """FlameError unless every field's set is the one fixed for the analysis and no other
        sum of it was decrypted this epoch; then the decryption is recorded (persisted)."""
        ledger = self._guard_ledger()
        analysis = self.analysis_id
        digests = {path: hashlib.sha256(v.to_bytes()).digest() for path, v in vectors.items()}
        fixed = dict(ledger.fixed_sets(analysis))
        for path, who in sets.items():
            done = ledger.answered(analysis, epoch, path)
            if done is not None and done != digests[path]:
                raise FlameError(
                    f"already answered a decryption request for {path!r} in epoch {epoch}; "
                    "a second one could reveal a difference of sums"
                )
            if self.keys.allow_changing_contributors:
                continue
            for first, earlier in _own_first(fixed, path):  # the guard spans fields
                problem = differencing_problem(first, earlier, who)
                if problem is not None:
                    where = "" if first == path else f" ({path!r})"
                    raise FlameError(f"refusing to decrypt{where}: {problem}")
            fixed.setdefault(path, who)  # fields of this same request, too
        for path, who in sets.items():
            ledger.record(analysis, epoch, path, who, digests[path])

    def _guard_ledger(self) -> GuardLedger:
        if self._ledger is None:
            private = self.keys.private_key
            assert private is not None
            secret = int(private.p) * 0x10001 + int(private.q)  # MAC key input, never sent
            self._ledger = GuardLedger.for_secret(self.node_id, secret, self.state, TAG)
        return self._ledger

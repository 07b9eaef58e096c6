"""The server's side of the masked sum: collects each round, says who is left, asks the
survivors for exactly the shares that remove the masks, and sums. It never sees a node's
input alone: only sums of masked inputs, with the masks of the summed nodes cancelling.

Every masked input has one length: the one given up front (`length`), else the one the
nodes of U2 stated with their shares (when they differ: the one t of them stated; nodes
stating another are left out of U2), else that of the first masked input. A vector of
another length is refused, never the sum.

Use: `receive` every message of the current round (refusals raise ProtocolViolation and
change nothing), then close the round with the next method (`keys`, `ciphertexts`,
`survivors`, `unmask`, `result`), which returns the message for each node still in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flame.protocols.masking.agreement import KEY_BYTES, check_point, pair_mask_key, public_raw
from flame.protocols.masking.client import PAIR, SELF, check_keys, open_peers, parse_share
from flame.protocols.masking.encoding import decode_sum
from flame.protocols.masking.errors import MaskingError, ProtocolViolation
from flame.protocols.masking.messages import (
    POINT_TO_POINT,
    Message,
    b64d,
    b64e,
    open_message,
)
from flame.protocols.masking.prg import MaskTerm, add_masks
from flame.protocols.masking.session import Session, self_mask_key
from flame.protocols.masking.shamir import combine_bytes, off_polynomial
from flame.protocols.paillier.errors import ContributorCountError

__all__ = ["MaskedSum", "MaskingServer"]

# the stages in order; each accepts the node messages of the round of its name
_ORDER = ["advertise", "shares", "masked", "consistency", "reveal", "done"]
# a robust reconstruction leaves out at most this many revealed shares, trying at most this
# many sets of them: enough for a few rogue revealers, bounded for the aggregator's CPU
_MAX_EXCLUDED = 3
_MAX_TRIES = 5000


@dataclass(frozen=True)
class MaskedSum:
    """The exact fixed-point sum over `contributors` (flat int64) and its float values."""

    encoded: npt.NDArray[np.int64]
    contributors: tuple[str, ...]
    scale: float

    def values(self) -> npt.NDArray[np.float64]:
        return self.encoded.astype(np.float64) / self.scale


class MaskingServer:
    """The aggregator's part in one session (signed mode as for MaskingClient).

    `carrier_authenticated` (signed mode only; a flame run with a roster): the nodes'
    point-to-point messages ("shares", "masked", "reveal") come unsigned, each handed to
    `receive` with the `sender` its signed envelope proved, which it must name; the
    server's own messages go unsigned. Forwarded ones (advertisements, consistency
    signatures, peer statements) are signed and checked as ever."""

    def __init__(
        self,
        session: Session,
        *,
        identity: Ed25519PrivateKey | None = None,
        identities: Mapping[str, Ed25519PublicKey] | None = None,
        min_contributors: int = 1,
        length: int | None = None,
        carrier_authenticated: bool = False,
    ) -> None:
        if (identity is None) != (identities is None):
            raise MaskingError("signed mode needs both the server's identity and the roster's keys")
        if carrier_authenticated and identities is None:
            raise MaskingError("carrier-authenticated mode needs signed mode (a roster)")
        self.carrier_authenticated = carrier_authenticated
        if length is not None and (isinstance(length, bool) or length < 1):
            raise MaskingError("the masked inputs' length must be a positive int")
        self.session = session
        self._identity = identity
        self._keys = dict(identities) if identities is not None else None
        self._context = session.binding.context()
        self.min_contributors = min_contributors
        self._stage = "advertise"
        self._got: dict[str, Message] = {}
        self._adverts: dict[str, Message] = {}
        self._pks: dict[str, tuple[bytes, bytes]] = {}
        self._sealed: dict[str, dict[str, str]] = {}
        self._commits: dict[str, bytes] = {}
        self._u2: tuple[str, ...] = ()
        self._u3: tuple[str, ...] = ()
        self._length: int | None = length
        self._stated: dict[str, int] = {}  # the input length each node stated with its shares
        self._peers: dict[str, tuple[str, frozenset[str]]] = {}  # statement, whom it masked with
        self._total: npt.NDArray[np.unsignedinteger] | None = None
        self._consistency: dict[str, Message] = {}
        self._reveals: dict[str, dict[str, dict[str, str]]] = {}
        self.refused = 0
        self.bad_revealers: set[str] = set()  # revealed shares off the secret's polynomial

    @property
    def stage(self) -> str:
        return self._stage

    def _allowed(self) -> set[str]:
        if self._stage == "advertise":
            return set(self.session.participants)
        if self._stage == "shares":
            return set(self._adverts)
        if self._stage == "masked":
            return set(self._u2)
        if self._stage == "consistency":
            return set(self._u3)
        if self._stage == "reveal":
            return set(self._consistency)
        return set()

    def receive(self, message: Message | bytes, *, sender: str | None = None) -> Message:
        """Check one node's message for the current round and keep it (or refuse it).
        `sender`: the node its carrier authenticated (its signed envelope); the message
        must name it. Required for the unsigned rounds of carrier-authenticated mode."""
        try:
            if self._stage == "done":
                raise ProtocolViolation("the sum is complete; no more messages are accepted")
            unsigned = self.carrier_authenticated and self._stage in POINT_TO_POINT
            msg = open_message(
                message,
                binding=self.session.binding,
                round=self._stage,
                keys=None if unsigned else self._keys,
                senders=self._allowed(),
                carrier=sender,
                unsigned=unsigned,
            )
            if msg.sender in self._got:
                raise ProtocolViolation(
                    f"a second {msg.round!r} message from {msg.sender!r} (replayed or duplicate)"
                )
            self._accept(msg)
        except ProtocolViolation:
            self.refused += 1
            raise
        self._got[msg.sender] = msg
        return msg

    def _accept(self, msg: Message) -> None:
        body = msg.body
        if msg.round == "advertise":
            c_pk = b64d(body.get("c_pk"), "c_pk")
            s_pk = b64d(body.get("s_pk"), "s_pk")
            if len(c_pk) != KEY_BYTES or len(s_pk) != KEY_BYTES:
                raise ProtocolViolation(f"advertise from {msg.sender!r}: malformed public keys")
            # what every honest node would refuse the whole round for (client.share_keys):
            # refused here, so only this node is left out
            if c_pk == s_pk:
                raise ProtocolViolation(f"advertise from {msg.sender!r}: its two keys are equal")
            taken = {k for pair in self._pks.values() for k in pair}
            if c_pk in taken or s_pk in taken:
                raise ProtocolViolation(
                    f"advertise from {msg.sender!r}: a key another node already advertised"
                )
            for key in (c_pk, s_pk):
                check_point(key, f"advertise from {msg.sender!r}")
            self._adverts[msg.sender] = msg
            self._pks[msg.sender] = (c_pk, s_pk)
        elif msg.round == "shares":
            sealed = body.get("to")
            expected = set(self._adverts) & self.session.neighbours(msg.sender)
            if not isinstance(sealed, dict) or set(sealed) != expected:
                raise ProtocolViolation(
                    f"shares from {msg.sender!r}: not one for each neighbour in U1"
                )
            if not all(isinstance(v, str) for v in sealed.values()):
                raise ProtocolViolation(f"shares from {msg.sender!r}: malformed")
            commit = b64d(body.get("seed_commit"), "seed_commit")
            if len(commit) != 32:
                raise ProtocolViolation(f"shares from {msg.sender!r}: malformed seed commitment")
            stated = body.get("length")
            if stated is not None:
                if not isinstance(stated, int) or isinstance(stated, bool) or stated < 1:
                    raise ProtocolViolation(f"shares from {msg.sender!r}: bad length")
                if self._length is not None and stated != self._length:
                    raise ProtocolViolation(
                        f"shares from {msg.sender!r}: an input of {stated} values, the sum "
                        f"has {self._length}"
                    )
                self._stated[msg.sender] = stated
            self._sealed[msg.sender] = sealed
            self._commits[msg.sender] = commit
        elif msg.round == "masked":
            self._add_masked(msg)
        elif msg.round == "consistency":
            if body.get("u3") != list(self._u3):
                raise ProtocolViolation(f"consistency from {msg.sender!r}: another survivor set")
            check_keys(body, self._pks[msg.sender], f"consistency from {msg.sender!r}")
            self._consistency[msg.sender] = msg
        elif msg.round == "reveal":
            held = self.session.holders(msg.sender)
            for kind, nodes in ((SELF, self._u3), (PAIR, set(self._u2) - set(self._u3))):
                part = body.get(kind)
                if not isinstance(part, dict) or set(part) != set(nodes) & held:
                    raise ProtocolViolation(
                        f"reveal from {msg.sender!r}: not the {kind} shares asked"
                    )
                for node, share in part.items():
                    parse_share(share, f"reveal from {msg.sender!r} about {node!r}")
            self._reveals[msg.sender] = {SELF: body[SELF], PAIR: body[PAIR]}

    def _add_masked(self, msg: Message) -> None:
        length, bits = msg.body.get("length"), msg.body.get("bits")
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ProtocolViolation(f"masked input from {msg.sender!r}: bad length")
        if bits != self.session.bits or len(msg.vector) != length * self.session.bits // 8:
            raise ProtocolViolation(f"masked input from {msg.sender!r}: wrong ring or size")
        expected = self._length if self._length is not None else self._stated.get(msg.sender)
        if expected is not None and length != expected:
            raise ProtocolViolation(
                f"masked input from {msg.sender!r} has {length} values, the sum {expected}"
            )
        raw = msg.body.get("peers")
        peers = open_peers(self.session, raw, msg.sender, self._keys, self._pks[msg.sender])
        if peers != self.session.neighbours(msg.sender) & set(self._u2):
            raise ProtocolViolation(
                f"masked input from {msg.sender!r}: it says it masked with other nodes than "
                "its neighbours in U2"
            )
        if len(peers) < self.session.peers_needed:
            raise ProtocolViolation(
                f"masked input from {msg.sender!r}: masked with {len(peers)} peers, fewer "
                f"than {self.session.peers_needed}"
            )
        self._peers[msg.sender] = (str(raw), peers)
        dtype = np.dtype(self.session.dtype).newbyteorder("<")
        vector = np.frombuffer(msg.vector, dtype=dtype)
        if self._total is None:
            self._length = length
            self._total = vector.astype(self.session.dtype)
        else:
            np.add(self._total, vector, out=self._total, casting="unsafe")

    def _close(self, stage: str, what: str) -> set[str]:
        if self._stage != stage:
            raise MaskingError(f"cannot close {stage!r}: the session is at {self._stage!r}")
        nodes = set(self._got)
        self.session.require(nodes, what)
        self._stage = _ORDER[_ORDER.index(stage) + 1]
        self._got = {}
        return nodes

    def _send(self, round: str, body: Mapping[str, object]) -> Message:
        msg = Message(self.session.binding, round, self.session.server, body)
        if self.carrier_authenticated:  # every server message is point-to-point
            return msg
        return msg.signed(self._identity)

    def keys(self) -> dict[str, Message]:
        """Close round 0: every node of U1 gets the signed advertisements of U1."""
        u1 = self._close("advertise", "nodes that advertised keys (U1)")
        adverts = {v: b64e(self._adverts[v].to_bytes()) for v in sorted(u1)}
        built: dict[frozenset[str], Message] = {}  # one message per set of holders (complete
        out = {}  # graph: one for all), so the caller encodes it once
        for v in sorted(u1):
            shown = frozenset(u1 & self.session.holders(v))
            if shown not in built:
                built[shown] = self._send(
                    "keys", {"adverts": {w: adverts[w] for w in sorted(shown)}}
                )
            out[v] = built[shown]
        return out

    def ciphertexts(self) -> dict[str, Message]:
        """Close round 1: each node of U2 gets the sealed shares addressed to it."""
        u2 = self._close("shares", "nodes that shared keys (U2)")
        if self._length is None and self._stated:
            counts: dict[int, int] = {}
            for v in u2 & set(self._stated):
                counts[self._stated[v]] = counts.get(self._stated[v], 0) + 1
            agreed = [
                n for n, c in counts.items() if c >= self.session.threshold or len(counts) == 1
            ]
            if not agreed:
                self._stage = "done"
                raise MaskingError(
                    "the nodes stated different input lengths, none by t of them; "
                    "the sum is abandoned"
                )
            self._length = agreed[0]  # t is a strict majority: at most one
            u2 = {v for v in u2 if self._stated.get(v, self._length) == self._length}
            self.refused += len(set(self._stated) - u2)
            try:
                self.session.require(u2, "nodes that shared keys of the agreed length (U2)")
            except MaskingError:
                self._stage = "done"
                raise
        self._u2 = tuple(sorted(u2))
        return {
            u: self._send(
                "ciphertexts",
                {
                    "u2": list(self._u2),
                    "from": {
                        v: self._sealed[v][u] for v in self._u2 if v in self.session.neighbours(u)
                    },
                },
            )
            for u in self._u2
        }

    def survivors(self) -> dict[str, Message]:
        """Close round 2: U3, the nodes whose masked input arrived."""
        u3 = self._close("masked", "nodes that sent masked input (U3)")
        if len(u3) < self.min_contributors:
            self._stage = "done"
            raise ContributorCountError(
                f"{len(u3)} masked inputs arrived, the sum needs at least {self.min_contributors}"
            )
        self._u3 = tuple(sorted(u3))
        message = self._send("survivors", {"u3": list(self._u3)})  # the same for every node
        return dict.fromkeys(self._u3, message)

    def unmask(self) -> dict[str, Message]:
        """Close round 3: ask each node of U4 for the self-mask share of every survivor and
        the pairwise-key share of every node that dropped after sharing keys."""
        u4 = self._close("consistency", "consistency signatures on U3 (U4)")
        u3 = set(self._u3)
        for v in self._u3:  # the nodes would refuse its self-mask share: stop, saying why
            kept = len(self._peers[v][1] & u3)
            if kept < self.session.peers_needed:
                self._stage = "done"
                raise MaskingError(
                    f"{v!r} kept {kept} neighbours it masked with in the survivor set, the "
                    f"sum needs {self.session.peers_needed}; the sum is abandoned"
                )
        signatures = {v: b64e(self._consistency[v].to_bytes()) for v in sorted(u4)}
        out = {}
        for u in sorted(u4):
            held = self.session.holders(u)
            want = [[v, SELF if v in u3 else PAIR] for v in self._u2 if v in held]
            statements = {v: self._peers[v][0] for v in self._u3 if v in held and v != u}
            body = {
                "u3": list(self._u3),
                "signatures": signatures,
                "want": want,
                "masked": statements,
            }
            out[u] = self._send("unmask", body)
        return out

    def result(self) -> MaskedSum:
        """Close round 4: reconstruct the secrets asked for, remove every mask, decode."""
        u5 = self._close("reveal", "nodes that revealed shares (U5)")
        if self._total is None:
            raise MaskingError("no masked input arrived")
        total = self._total
        bits = self.session.bits
        reveals = {u: self._reveals[u] for u in u5}
        masks: list[MaskTerm] = []  # every mask left in the total, removed at once below
        for v in self._u3:
            shares = {u: int(r[SELF][v], 16) for u, r in reveals.items() if v in r[SELF]}

            def committed(seed: bytes, v: str = v) -> bool:
                check = hashlib.sha256(b"flame-masking-seed\0" + self._context + seed).digest()
                return check == self._commits[v]

            seed = self._rebuild(shares, committed, f"the self-mask seed of {v!r}")
            masks.append((self_mask_key(seed, self._context, v), -1))
        for v in sorted(set(self._u2) - set(self._u3)):
            shares = {u: int(r[PAIR][v], 16) for u, r in reveals.items() if v in r[PAIR]}

            def advertised(raw: bytes, v: str = v) -> bool:
                return public_raw(X25519PrivateKey.from_private_bytes(raw)) == self._pks[v][1]

            raw = self._rebuild(shares, advertised, f"the pairwise key of dropped node {v!r}")
            private = X25519PrivateKey.from_private_bytes(raw)
            for w in sorted(self.session.neighbours(v) & set(self._u3)):
                key = pair_mask_key(private, self._pks[w][1], self._context, v, w)
                masks.append((key, -1 if w < v else +1))
        if self.bad_revealers:
            self.refused += len(self.bad_revealers)
        add_masks(total, masks, bits)
        encoded = decode_sum(total, self.session.spec, len(self._u3))
        return MaskedSum(encoded, self._u3, self.session.spec.scale)

    def _rebuild(self, shares: dict[str, int], valid: Callable[[bytes], bool], what: str) -> bytes:
        """The secret the revealed `shares` ({revealer: y}) rebuild, checked by `valid`
        (its commitment or advertised public key). When they disagree or rebuild a wrong
        secret, a revealer altered its share: leave out the revealers already caught, then
        every set of up to `_MAX_EXCLUDED` of the others (at most `_MAX_TRIES` sets), take
        the first set whose remaining (at least t_k) shares lie on one polynomial and pass
        the check, and name the revealers off it (`bad_revealers`). Refused (MaskingError)
        only if no such set is found."""
        t = self.session.shares_needed
        index = self.session.index
        order = sorted(shares, key=lambda u: (u in self.bad_revealers, u))
        tries = 0
        for size in range(min(len(shares) - t, _MAX_EXCLUDED) + 1):
            for left_out in combinations(reversed(order), size):
                kept = {index(u): shares[u] for u in shares if u not in left_out}
                tries += 1
                if tries > _MAX_TRIES:
                    break
                try:
                    secret = combine_bytes(kept, t)
                except MaskingError:
                    continue
                if not valid(secret):
                    continue
                off = off_polynomial(kept, {index(u): shares[u] for u in shares}, t)
                self.bad_revealers.update(u for u in shares if index(u) in off)
                return secret
        raise MaskingError(
            f"{what}: no {t} of the {len(shares)} revealed shares rebuild it (tried "
            f"{min(tries, _MAX_TRIES)} sets); the sum is abandoned"
        )

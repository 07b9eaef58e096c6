"""A node's side of the masked sum (Bonawitz et al., CCS 2017), as a state machine with no
network: each method takes the server's message of the previous round and returns the
node's message for the next. Called out of order or twice, a method refuses.

The rules that keep a node's input hidden even from a server that lies: for every other
node v a node reveals exactly one kind of share, fixed by whether v is in the survivor set
U3 that at least t nodes signed: v in U3 -> the share of v's self-mask seed; v dropped
(shared keys, sent no input) -> the share of v's pairwise key. A request asking for both
kinds, for the other kind, or under another survivor set is refused as a whole. And the
self-mask share of a survivor v only when v's own signed statement of the peers it masked
with (sent with its masked input, relayed by the server) leaves at least
`Session.peers_needed` of them in U3: one of them is then honest, and the mask of that pair
stays on v's input whatever U2 the server told v or declares dropped. A node masks only
when U2 leaves it that many peers.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flame.protocols.masking.agreement import (
    KEY_BYTES,
    open_share,
    pair_mask_key,
    private_raw,
    public_raw,
    seal_share,
    share_key,
)
from flame.protocols.masking.encoding import RingInput
from flame.protocols.masking.errors import MaskingError, ProtocolViolation
from flame.protocols.masking.messages import (
    POINT_TO_POINT,
    Message,
    b64d,
    b64e,
    open_message,
)
from flame.protocols.masking.prg import RING_DTYPES, MaskTerm, add_masks
from flame.protocols.masking.session import Session, self_mask_key
from flame.protocols.masking.shamir import PRIME, split_bytes

__all__ = ["MaskingClient", "keys_digest", "open_peers", "parse_share", "parse_survivors"]

SELF, PAIR = "self", "pair"


def keys_digest(keys: tuple[bytes, bytes]) -> str:
    """What a node's forwarded statements carry of its session: a digest of the two fresh
    public keys it advertised (c_pk, s_pk). A statement is taken only with the keys the
    verifier holds for its signer from THIS session's verified advertisements, so one signed
    in an earlier session of the same binding (a restarted sum) is refused."""
    c_pk, s_pk = keys
    return b64e(hashlib.sha256(b"flame-masking-keys-v1\0" + c_pk + s_pk).digest())


def check_keys(body: Mapping[str, object], keys: tuple[bytes, bytes] | None, what: str) -> None:
    """`body` names its signer's keys of this session; checked against `keys` when known."""
    stated = body.get("keys")
    if not isinstance(stated, str) or len(stated) != 44:
        raise ProtocolViolation(f"{what}: names no keys of its session")
    if keys is not None and stated != keys_digest(keys):
        raise ProtocolViolation(
            f"{what}: signed with other keys than its signer advertised in this session "
            "(from an earlier session of the same sum): refused"
        )


def parse_share(text: object, what: str) -> int:
    """A Shamir share's y as sent (hex text), checked to lie in the field."""
    if not isinstance(text, str) or not 0 < len(text) <= 140:
        raise ProtocolViolation(f"{what}: expected a hex share")
    try:
        value = int(text, 16)
    except ValueError:
        raise ProtocolViolation(f"{what}: not a hex share") from None
    if not 0 <= value < PRIME:
        raise ProtocolViolation(f"{what}: share outside the field")
    return value


def parse_survivors(session: Session, value: object, what: str) -> tuple[str, ...]:
    """A sorted, duplicate-free list of participants, as sent."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolViolation(f"{what}: expected a list of node ids")
    nodes = tuple(value)
    if nodes != tuple(sorted(set(nodes))) or not set(nodes) <= set(session.participants):
        raise ProtocolViolation(f"{what}: not a sorted list of distinct participants")
    return nodes


def open_peers(
    session: Session,
    raw: object,
    node: str,
    keys: Mapping[str, Ed25519PublicKey] | None,
    advertised: tuple[bytes, bytes],
) -> frozenset[str]:
    """The peers `node` masked with, from its signed "peers" statement (base64 wire bytes):
    its neighbours less those it lists as skipped. The statement must name `advertised`,
    the keys `node` advertised in this session (every holder of its shares has them)."""
    if raw is None:
        raise ProtocolViolation(f"no signed statement of the peers {node!r} masked with")
    statement = open_message(
        b64d(raw, f"peers of {node!r}"),
        binding=session.binding,
        round="peers",
        keys=keys,
        senders={node},
    )
    check_keys(statement.body, advertised, f"peers of {node!r}")
    skipped = parse_survivors(session, statement.body.get("skipped"), f"peers of {node!r}")
    return session.neighbours(node) - set(skipped)


class _Premask:
    """The sum of a node's masks, made in a thread while the node waits for the next round
    (ChaCha20 and numpy release the GIL); `result` waits for it."""

    def __init__(self, length: int, bits: int, masks: list[MaskTerm]) -> None:
        self._acc = np.zeros(length, dtype=np.dtype(RING_DTYPES[bits]).newbyteorder("<"))
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(bits, masks), name="flame-premask", daemon=True
        )
        self._thread.start()

    def _run(self, bits: int, masks: list[MaskTerm]) -> None:
        try:
            add_masks(self._acc, masks, bits)
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self) -> npt.NDArray[np.unsignedinteger] | None:
        self._thread.join()
        return None if self._error is not None else self._acc


class MaskingClient:
    """One node's part in one session. Signed mode when `identities` (Ed25519 public keys
    of every participant and of the server) is given: then `identity` signs this node's
    messages and every message it acts on must carry its sender's valid signature.

    `carrier_authenticated` (signed mode only; a flame run with a roster): the messages
    between this node and the server travel in envelopes signed with the same identity
    keys, so its point-to-point messages (`messages.POINT_TO_POINT`) carry no signature of
    their own; each server message must then be handed over with the `sender` its carrier
    verified, which must be the server. What other nodes read (advertisement, peer
    statement, consistency signature) stays signed."""

    def __init__(
        self,
        session: Session,
        node_id: str,
        *,
        identity: Ed25519PrivateKey | None = None,
        identities: Mapping[str, Ed25519PublicKey] | None = None,
        carrier_authenticated: bool = False,
    ) -> None:
        session.index(node_id)
        if (identity is None) != (identities is None):
            raise MaskingError("signed mode needs both this node's identity and the roster's keys")
        if carrier_authenticated and identity is None:
            raise MaskingError("carrier-authenticated mode needs signed mode (a roster)")
        self.carrier_authenticated = carrier_authenticated
        self.session = session
        self.node_id = node_id
        self._identity = identity
        self._keys = dict(identities) if identities is not None else None
        self._context = session.binding.context()
        self._c = X25519PrivateKey.generate()
        self._s = X25519PrivateKey.generate()
        self._seed = secrets.token_bytes(KEY_BYTES)
        self._stage = "advertise"
        self._u1: dict[str, tuple[bytes, bytes]] = {}
        self._u2: tuple[str, ...] = ()
        self._u3: tuple[str, ...] = ()
        self._held: dict[str, tuple[int, int]] = {}  # v -> (share of v's s key, of v's seed)
        self._share_keys: dict[str, bytes] = {}  # v -> the key sealing shares with v
        self._premask: _Premask | None = None
        self._length: int | None = None  # the input length this node stated
        self._peers: frozenset[str] = frozenset()  # whom it masked with

    def _advance(self, expected: str, following: str) -> None:
        if self._stage != expected:
            raise ProtocolViolation(
                f"{self.node_id}: asked for the {expected!r} step while at {self._stage!r} "
                "(out of order or replayed)"
            )
        self._stage = following

    def _make(
        self, round: str, body: dict[str, object], vector: bytes | memoryview = b""
    ) -> Message:
        msg = Message(self.session.binding, round, self.node_id, body, vector)
        if self.carrier_authenticated and round in POINT_TO_POINT:
            return msg  # the envelope carrying it is signed with the same key
        return msg.signed(self._identity)

    def _from_server(self, message: Message | bytes, round: str, sender: str | None) -> Message:
        """The server's message of `round`; `sender` is who the carrier says sent it
        (required in carrier-authenticated mode, where the message itself is unsigned)."""
        carrier = self.carrier_authenticated
        return open_message(
            message,
            binding=self.session.binding,
            round=round,
            keys=None if carrier else self._keys,
            senders={self.session.server},
            carrier=sender,
            unsigned=carrier,
        )

    def advertise(self, extra: Mapping[str, object] | None = None) -> Message:
        """Round 0: this node's two fresh public keys (plus `extra`, e.g. the field's shape
        and encoding, signed with them)."""
        self._advance("advertise", "share")
        body: dict[str, object] = dict(extra or {})
        body.update(c_pk=b64e(public_raw(self._c)), s_pk=b64e(public_raw(self._s)))
        return self._make("advertise", body)

    def share_keys(
        self, keys: Message | bytes, *, length: int | None = None, sender: str | None = None
    ) -> Message:
        """Round 1: check the signed advertisements of U1 (on a sparse graph: of this node's
        neighbours in U1); seal shares of this node's pairwise private key and self-mask
        seed to each of them (t of |U1|, or t_k of its neighbours and itself). Given the
        input's `length`, the node starts making its masks (self and with every neighbour
        in U1) in the background, to be ready when the next round asks for its input, and
        states the length in its signed reply (the server refuses other lengths)."""
        self._advance("share", "masked")
        msg = self._from_server(keys, "keys", sender)
        adverts = msg.body.get("adverts")
        if not isinstance(adverts, dict):
            raise ProtocolViolation("keys: no advertisements")
        participants = set(self.session.participants)
        mine = self.session.holders(self.node_id)
        for node, raw in adverts.items():
            if node not in participants:
                raise ProtocolViolation(f"keys: advertisement of non-participant {node!r}")
            if node not in mine:
                raise ProtocolViolation(f"keys: advertisement of {node!r}, not a neighbour")
            ad = open_message(
                b64d(raw, f"advertisement of {node!r}"),
                binding=self.session.binding,
                round="advertise",
                keys=self._keys,
                senders={node},
            )
            c_pk = b64d(ad.body.get("c_pk"), f"c_pk of {node!r}")
            s_pk = b64d(ad.body.get("s_pk"), f"s_pk of {node!r}")
            if len(c_pk) != KEY_BYTES or len(s_pk) != KEY_BYTES:
                raise ProtocolViolation(f"keys: malformed public keys of {node!r}")
            self._u1[node] = (c_pk, s_pk)
        own = (public_raw(self._c), public_raw(self._s))
        if self._u1.get(self.node_id) != own:
            raise ProtocolViolation("keys: this node's own keys are missing or substituted")
        all_keys = [k for pair in self._u1.values() for k in pair]
        if len(set(all_keys)) != len(all_keys):
            raise ProtocolViolation("keys: two advertised public keys are equal")
        if self.session.graph.sparse:
            self.session.require(
                self._u1, "this node's neighbours that advertised keys", holders=True
            )
        else:
            self.session.require(self._u1, "advertised keys (U1)")
        holders = {v: self.session.index(v) for v in self._u1}
        t = self.session.shares_needed
        s_shares = split_bytes(private_raw(self._s), t, holders.values())
        b_shares = split_bytes(self._seed, t, holders.values())
        sealed: dict[str, str] = {}
        for v, x in holders.items():
            if v == self.node_id:
                self._held[v] = (s_shares[x], b_shares[x])
                continue
            plain = json.dumps({"s": format(s_shares[x], "x"), "b": format(b_shares[x], "x")})
            key = share_key(self._c, self._u1[v][0], self._context, self.node_id, v)
            self._share_keys[v] = key  # opens v's shares to this node in the next round
            sealed[v] = b64e(
                seal_share(key, self._u1[v][0], self._context, self.node_id, v, plain.encode())
            )
        commit = hashlib.sha256(b"flame-masking-seed\0" + self._context + self._seed).digest()
        body: dict[str, object] = {"to": sealed, "seed_commit": b64e(commit)}
        if length is not None and length > 0:
            self._length = body["length"] = int(length)
        reply = self._make("shares", body)
        if length is not None and length > 0:
            peers = set(self._u1) & self.session.neighbours(self.node_id)
            self._premask = _Premask(length, self.session.bits, self._masks(peers))
        return reply

    def _masks(self, peers: set[str], *, own: bool = True) -> list[MaskTerm]:
        """This node's self mask (+, unless not `own`) and its pairwise masks with `peers`
        (the sign set by the order of the two ids)."""
        masks: list[MaskTerm] = []
        if own:
            masks.append((self_mask_key(self._seed, self._context, self.node_id), +1))
        for v in sorted(peers):
            key = pair_mask_key(self._s, self._u1[v][1], self._context, self.node_id, v)
            masks.append((key, +1 if self.node_id < v else -1))
        return masks

    def masked_input(
        self, ciphertexts: Message | bytes, values: object, *, sender: str | None = None
    ) -> Message:
        """Round 2: the input, encoded (refused past its bound before any mask is made),
        plus this node's self mask and its pairwise masks with every node (neighbour) of U2,
        and a signed statement of the neighbours it did not mask with. Refused when U2
        leaves fewer than `Session.peers_needed` peers: the server could then declare them
        all dropped and strip every mask. `values` may be a `RingInput` encoded (and so
        checked) earlier for this session's spec."""
        self._advance("masked", "consistency")
        spec, field = self.session.spec, self.session.binding.field
        if not isinstance(values, RingInput):
            values = RingInput.encode(values, spec, field=field)
        elif values.spec != spec or values.ring.dtype != self.session.dtype:
            raise MaskingError(f"{field}: the input was encoded for another spec")
        encoded = values.ring
        if self._length is not None and encoded.size != self._length:
            raise MaskingError(
                f"{field}: {encoded.size} values, but this node stated {self._length}"
            )
        msg = self._from_server(ciphertexts, "ciphertexts", sender)
        u2 = parse_survivors(self.session, msg.body.get("u2"), "ciphertexts: u2")
        sealed = msg.body.get("from")
        peers = set(u2) & self.session.neighbours(self.node_id)
        if not isinstance(sealed, dict) or set(sealed) != peers:
            raise ProtocolViolation("ciphertexts: the shares do not match the list U2")
        if self.node_id not in u2 or not peers <= set(self._u1):
            raise ProtocolViolation("ciphertexts: U2 is not a subset of U1 holding this node")
        self.session.require(u2, "nodes that shared keys (U2)")
        if len(peers) < self.session.peers_needed:
            raise ProtocolViolation(
                f"ciphertexts: U2 leaves this node {len(peers)} peers to mask with, fewer than "
                f"{self.session.peers_needed}: declared dropped, they would expose its input; "
                "refused"
            )
        for v, raw in sealed.items():
            plain = open_share(
                self._share_keys.get(v, self._c),
                self._u1[v][0],
                self._context,
                v,
                self.node_id,
                b64d(raw, v),
            )
            try:
                shares = json.loads(plain)
            except (ValueError, RecursionError):  # bad JSON, too many digits, too deep
                raise ProtocolViolation(f"ciphertexts: shares from {v!r} are malformed") from None
            if not isinstance(shares, dict):
                raise ProtocolViolation(f"ciphertexts: shares from {v!r} are malformed")
            self._held[v] = (parse_share(shares.get("s"), v), parse_share(shares.get("b"), v))
        self._u2 = u2
        self._peers = frozenset(peers)
        skipped = sorted(self.session.neighbours(self.node_id) - peers)
        own = self._u1[self.node_id]
        statement = self._make("peers", {"skipped": skipped, "keys": keys_digest(own)}).to_bytes()
        bits = self.session.bits
        premask, self._premask = self._premask, None
        ready = premask.result() if premask is not None else None
        if ready is not None and ready.size == encoded.size:
            acc = ready  # made while waiting: remove the masks of neighbours not in U2
            gone = (set(self._u1) & self.session.neighbours(self.node_id)) - peers
            add_masks(acc, [(key, -sign) for key, sign in self._masks(gone, own=False)], bits)
            np.add(acc, encoded, out=acc)
        else:
            acc = encoded.astype(encoded.dtype.newbyteorder("<"))  # a copy, masked in place
            add_masks(acc, self._masks(peers), bits)
        vector = acc.data.cast("B")  # the wire bytes, without another copy
        body = {"length": int(acc.size), "bits": bits, "peers": b64e(statement)}
        return self._make("masked", body, vector)

    def consistency(self, survivors: Message | bytes, *, sender: str | None = None) -> Message:
        """Round 3: sign U3, the nodes whose masked input the server says it has."""
        self._advance("consistency", "reveal")
        msg = self._from_server(survivors, "survivors", sender)
        u3 = parse_survivors(self.session, msg.body.get("u3"), "survivors: u3")
        if not set(u3) <= set(self._u2) or self.node_id not in u3:
            raise ProtocolViolation("survivors: U3 is not a subset of U2 holding this node")
        self.session.require(u3, "nodes that sent masked input (U3)")
        self._u3 = u3
        return self._make(
            "consistency", {"u3": list(u3), "keys": keys_digest(self._u1[self.node_id])}
        )

    def reveal(self, unmask: Message | bytes, *, sender: str | None = None) -> Message:
        """Round 4: for each node the server asks about, exactly one kind of share, or a
        refusal of the whole request (ProtocolViolation) and nothing revealed."""
        self._advance("reveal", "done")
        msg = self._from_server(unmask, "unmask", sender)
        u3 = parse_survivors(self.session, msg.body.get("u3"), "unmask: u3")
        if u3 != self._u3:
            raise ProtocolViolation(
                "unmask: a different survivor set than the one this node signed"
            )
        self._check_signatures(msg.body.get("signatures"))
        want = msg.body.get("want")
        if not isinstance(want, list):
            raise ProtocolViolation("unmask: no list of wanted shares")
        statements = msg.body.get("masked", {})
        if not isinstance(statements, dict):
            raise ProtocolViolation("unmask: malformed peer statements")
        out: dict[str, dict[str, str]] = {SELF: {}, PAIR: {}}
        for item in want:
            if not (
                isinstance(item, list) and len(item) == 2 and all(isinstance(i, str) for i in item)
            ):
                raise ProtocolViolation("unmask: a wanted share is not [node, kind]")
            node, kind = item
            if node in out[SELF] or node in out[PAIR]:
                raise ProtocolViolation(
                    f"unmask: asks twice about {node!r} (both kinds of its shares would reveal "
                    "its input); refused"
                )
            if node not in self._held or node not in self._u2:
                raise ProtocolViolation(f"unmask: this node holds no shares of {node!r}")
            allowed = SELF if node in u3 else PAIR
            if kind != allowed:
                raise ProtocolViolation(
                    f"unmask: asks for the {kind!r} share of {node!r}, but the signed survivor "
                    f"set allows only its {allowed!r} share; refused"
                )
            if kind == SELF:
                peers = (
                    self._peers
                    if node == self.node_id
                    else open_peers(
                        self.session, statements.get(node), node, self._keys, self._u1[node]
                    )
                )
                kept = len(peers & set(u3))
                if kept < self.session.peers_needed:
                    raise ProtocolViolation(
                        f"unmask: {node!r} kept {kept} neighbours it masked with in the "
                        f"survivor set, fewer than {self.session.peers_needed}: its self-mask "
                        "share could expose its input; refused"
                    )
            s_share, b_share = self._held[node]
            out[kind][node] = format(b_share if kind == SELF else s_share, "x")
        return self._make("reveal", {SELF: out[SELF], PAIR: out[PAIR]})

    def _check_signatures(self, signatures: object) -> None:
        """At least t nodes of U3 signed exactly this node's U3 (so all honest nodes agree)."""
        if not isinstance(signatures, dict):
            raise ProtocolViolation("unmask: no consistency signatures")
        signers = []
        for node, raw in signatures.items():
            sig = open_message(
                b64d(raw, f"consistency of {node!r}"),
                binding=self.session.binding,
                round="consistency",
                keys=self._keys,
                senders={node} & set(self._u3),
            )
            if sig.body.get("u3") != list(self._u3):
                raise ProtocolViolation(f"unmask: {node!r} signed a different survivor set")
            # the signer's keys of this session, where this node has them (its neighbours;
            # on the complete graph everyone). A non-neighbour's is only checked for form: a
            # signature of an earlier session of this binding (which names the run, so the
            # same run) says the same U3, for an honest node's guard signs at most one
            # survivor set per (epoch, field), kept in its node-local state across restarts
            check_keys(sig.body, self._u1.get(node), f"consistency of {node!r}")
            signers.append(node)
        self.session.require(signers, "consistency signatures on U3")

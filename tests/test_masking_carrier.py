"""Carrier-authenticated mode of the masking protocol (a flame run with a roster): the
point-to-point messages travel without a signature of their own, since their envelope is
signed with the same key, and each is pinned to the sender its carrier verified; what is
forwarded to other nodes (advertisements, peer statements, consistency signatures) stays
signed. Each test below fails if the check it names is removed."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from masking_parties import SPEC, ids_for, nodes

from flame.protocols.masking import (
    Binding,
    MaskingClient,
    MaskingError,
    MaskingServer,
    Message,
    ProtocolViolation,
    Session,
    run_local,
)
from flame.protocols.masking.messages import FORWARDED, POINT_TO_POINT, b64d, b64e

NODES = nodes(5)
BINDING = Binding("ana-carrier", 3, "update")
SERVER = "aggregator"
LENGTH = 8
VICTIM, ATTACKER = NODES[1], NODES[0]


def sess(binding: Binding = BINDING) -> Session:
    return Session(binding, NODES, 4, SPEC)


class Carrier:
    """Every node of a session and the server, driven round by round as a flame run's
    transport would: each message handed over with the sender its envelope proved. `seen`
    keeps every message sent, by round; nodes in `hold` of a step answer, but their reply
    is not delivered (the test delivers it, or a forgery, itself)."""

    def __init__(self, *, carrier: bool = True, binding: Binding = BINDING) -> None:
        self.sess = sess(binding)
        self.ids = ids_for(NODES)
        pubs = {k: v.public_key() for k, v in self.ids.items()}
        self.clients = {
            v: MaskingClient(
                self.sess, v, identity=self.ids[v], identities=pubs, carrier_authenticated=carrier
            )
            for v in NODES
        }
        self.server = MaskingServer(
            self.sess,
            identity=self.ids[SERVER],
            identities=pubs,
            length=LENGTH,
            carrier_authenticated=carrier,
        )
        rng = np.random.default_rng(9)
        self.values = {v: rng.uniform(-100, 100, LENGTH) for v in NODES}
        self.seen: dict[str, list[Message]] = {}

    def note(self, msg: Message) -> Message:
        self.seen.setdefault(msg.round, []).append(msg)
        return msg

    def advertise(self) -> None:
        for v, client in self.clients.items():
            self.server.receive(self.note(client.advertise()).to_bytes(), sender=v)

    def step(self, name: str, hold: tuple[str, ...] = ()) -> dict[str, Message]:
        replies = {}
        for v, msg in getattr(self.server, name)().items():
            data, client = self.note(msg).to_bytes(), self.clients[v]
            if name == "keys":
                reply = client.share_keys(data, length=LENGTH, sender=SERVER)
            elif name == "ciphertexts":
                reply = client.masked_input(data, self.values[v], sender=SERVER)
            elif name == "survivors":
                reply = client.consistency(data, sender=SERVER)
            else:
                reply = client.reveal(data, sender=SERVER)
            replies[v] = self.note(reply)
            if v not in hold:
                self.server.receive(reply.to_bytes(), sender=v)
        return replies

    def until(self, name: str, hold: tuple[str, ...] = ()) -> dict[str, Message]:
        """Every round up to and including the step `name` (its replies returned)."""
        self.advertise()
        for step in ("keys", "ciphertexts", "survivors", "unmask"):
            replies = self.step(step, hold if step == name else ())
            if step == name:
                return replies
        raise AssertionError(name)

    def exact(self, who: tuple[str, ...] = NODES) -> Any:
        return sum(np.rint(self.values[v] * SPEC.scale).astype(np.int64) for v in who)


def unsigned(msg: Message, **changes: Any) -> bytes:
    return replace(msg, signature=b"", **changes).to_bytes()


@pytest.mark.parametrize("carrier", [True, False])
def test_carrier_mode_signs_what_is_forwarded_and_nothing_else(carrier: bool) -> None:
    party = Carrier(carrier=carrier)
    party.until("unmask")
    assert np.array_equal(party.server.result().encoded, party.exact())
    assert set(party.seen) == set(POINT_TO_POINT | FORWARDED) - {"peers"}
    for round, messages in party.seen.items():
        signed = {len(m.signature) for m in messages}
        assert signed == ({64} if round in FORWARDED or not carrier else {0}), round
    for masked in party.seen["masked"]:  # the peer statement inside: forwarded, signed
        statement = Message.from_bytes(b64d(masked.body["peers"], "peers"))
        assert statement.round == "peers" and len(statement.signature) == 64


def test_run_local_signs_everything_unless_told_the_carrier_authenticates() -> None:
    ids = ids_for(NODES)
    values = Carrier().values
    for carrier in (False, True):
        run = run_local(sess(), values, identities=ids, carrier_authenticated=carrier)
        exact = sum(np.rint(values[v] * SPEC.scale).astype(np.int64) for v in NODES)
        assert np.array_equal(run.result.encoded, exact)
    with pytest.raises(MaskingError, match="needs signed mode"):
        run_local(sess(), values, carrier_authenticated=True)  # no roster: nothing to lean on
    with pytest.raises(MaskingError, match="needs signed mode"):
        MaskingServer(sess(), carrier_authenticated=True)


@pytest.mark.parametrize("round", ["shares", "masked", "reveal"])
def test_a_node_cannot_send_a_point_to_point_message_in_another_nodes_name(round: str) -> None:
    """A colluding node puts a message naming the victim into its own signed envelope
    (the server's `receive(sender=...)` check); the victim's own is then still taken."""
    step = {"shares": "keys", "masked": "ciphertexts", "reveal": "unmask"}[round]
    party = Carrier()
    replies = party.until(step, hold=(VICTIM,))
    genuine = replies[VICTIM]
    body = dict(genuine.body)
    if round == "shares":  # shares and a seed commitment of the attacker's choosing
        body["seed_commit"] = b64e(bytes(32))
    elif round == "reveal":  # shares that would spoil the reconstruction
        body = {kind: dict.fromkeys(part, "1") for kind, part in body.items()}
    forged = Message(BINDING, round, VICTIM, body, genuine.vector)
    for data in (forged.to_bytes(), genuine.to_bytes()):  # a forgery, or the victim's bytes
        with pytest.raises(
            ProtocolViolation, match=f"in the name of '{VICTIM}' arrived from '{ATTACKER}'"
        ):
            party.server.receive(data, sender=ATTACKER)
    party.server.receive(genuine.to_bytes(), sender=VICTIM)
    steps = ("keys", "ciphertexts", "survivors", "unmask")
    for later in steps[steps.index(step) + 1 :]:
        party.step(later)
    assert np.array_equal(party.server.result().encoded, party.exact())


def test_carrier_mode_refuses_a_point_to_point_message_without_its_carrier_sender() -> None:
    party = Carrier()
    client = party.clients[VICTIM]
    for c in party.clients.values():  # advertisements: signed, their sender optional
        party.server.receive(c.advertise().to_bytes())
    keys = party.server.keys()
    with pytest.raises(ProtocolViolation, match="'keys' message from 'aggregator' without"):
        client.share_keys(keys[VICTIM].to_bytes(), length=LENGTH)
    other = party.clients[ATTACKER]
    reply = other.share_keys(keys[ATTACKER].to_bytes(), length=LENGTH, sender=SERVER)
    with pytest.raises(ProtocolViolation, match=f"'shares' message from '{ATTACKER}' without"):
        party.server.receive(reply.to_bytes())
    party.server.receive(reply.to_bytes(), sender=ATTACKER)  # with it: taken
    assert party.server.refused == 1


def test_a_node_takes_the_server_messages_only_from_the_server() -> None:
    """A peer relaying (or writing) a server message in its own envelope is refused."""
    party = Carrier()
    party.advertise()
    keys = party.server.keys()
    with pytest.raises(ProtocolViolation, match=f"arrived from '{ATTACKER}'"):
        party.clients[VICTIM].share_keys(keys[VICTIM].to_bytes(), length=LENGTH, sender=ATTACKER)


def test_a_signature_where_none_belongs_or_none_where_one_must_be_is_refused() -> None:
    party = Carrier()
    replies = party.until("keys", hold=(VICTIM,))
    shares = replies[VICTIM]
    signed = shares.signed(party.ids[VICTIM]).to_bytes()
    with pytest.raises(ProtocolViolation, match=f"'shares' message from '{VICTIM}' is signed"):
        party.server.receive(signed, sender=VICTIM)
    party.server.receive(shares.to_bytes(), sender=VICTIM)
    # a server message signed where the carrier vouches for it
    ciphertexts = party.server.ciphertexts()
    resigned = ciphertexts[VICTIM].signed(party.ids[SERVER]).to_bytes()
    with pytest.raises(ProtocolViolation, match="'ciphertexts' message from 'aggregator' is sig"):
        party.clients[VICTIM].masked_input(resigned, party.values[VICTIM], sender=SERVER)

    # without carrier mode, an unsigned point-to-point message is refused either way
    plain = Carrier(carrier=False)
    replies = plain.until("keys", hold=(VICTIM,))
    with pytest.raises(ProtocolViolation, match=f"'shares' message from '{VICTIM}' is unsigned"):
        plain.server.receive(unsigned(replies[VICTIM]), sender=VICTIM)
    ciphertexts = plain.server.ciphertexts()
    with pytest.raises(ProtocolViolation, match="'ciphertexts' message from 'aggregator' is uns"):
        plain.clients[ATTACKER].masked_input(
            unsigned(ciphertexts[ATTACKER]), plain.values[ATTACKER], sender=SERVER
        )


def test_forwarded_messages_stay_signed_in_carrier_mode() -> None:
    """An advertisement, a peer statement and a consistency signature reach third parties
    through the server: without their own signature each is refused."""
    party = Carrier()
    ad = party.clients[VICTIM].advertise()
    with pytest.raises(ProtocolViolation, match=f"'advertise' message from '{VICTIM}' is unsig"):
        party.server.receive(unsigned(ad), sender=VICTIM)

    party = Carrier()
    party.advertise()
    keys = party.server.keys()
    adverts = dict(keys[ATTACKER].body["adverts"])
    stripped = Message.from_bytes(b64d(adverts[VICTIM], "ad"))
    adverts[VICTIM] = b64e(unsigned(stripped))
    forged = replace(keys[ATTACKER], body={"adverts": adverts}).to_bytes()
    with pytest.raises(ProtocolViolation, match=f"'advertise' message from '{VICTIM}' is unsig"):
        party.clients[ATTACKER].share_keys(forged, length=LENGTH, sender=SERVER)

    party = Carrier()
    masked = party.until("ciphertexts", hold=(VICTIM,))[VICTIM]
    statement = Message.from_bytes(b64d(masked.body["peers"], "peers"))
    body = {**masked.body, "peers": b64e(unsigned(statement))}
    with pytest.raises(ProtocolViolation, match=f"'peers' message from '{VICTIM}' is unsigned"):
        party.server.receive(replace(masked, body=body).to_bytes(), sender=VICTIM)

    party = Carrier()
    unmask = party.until("survivors") and party.server.unmask()
    signatures = dict(unmask[ATTACKER].body["signatures"])
    signatures[VICTIM] = b64e(unsigned(Message.from_bytes(b64d(signatures[VICTIM], "c"))))
    forged = replace(unmask[ATTACKER], body={**unmask[ATTACKER].body, "signatures": signatures})
    with pytest.raises(ProtocolViolation, match=f"'consistency' message from '{VICTIM}' is uns"):
        party.clients[ATTACKER].reveal(forged.to_bytes(), sender=SERVER)


def test_unsigned_messages_are_bound_as_strictly_as_signed_ones() -> None:
    party = Carrier()
    replies = party.until("ciphertexts", hold=(VICTIM,))
    masked = replies[VICTIM]
    other = Binding(BINDING.analysis, BINDING.epoch + 1, BINDING.field)
    with pytest.raises(ProtocolViolation, match="another session"):
        party.server.receive(replace(masked, binding=other).to_bytes(), sender=VICTIM)
    shares = party.seen["shares"][1]
    assert shares.sender == VICTIM
    with pytest.raises(ProtocolViolation, match="where a 'masked' message was expected"):
        party.server.receive(shares.to_bytes(), sender=VICTIM)
    stray = Message(BINDING, "masked", "intruder", masked.body, masked.vector)
    with pytest.raises(ProtocolViolation, match="may not send it"):
        party.server.receive(stray.to_bytes(), sender="intruder")
    party.server.receive(masked.to_bytes(), sender=VICTIM)
    with pytest.raises(ProtocolViolation, match="replayed or duplicate"):
        party.server.receive(masked.to_bytes(), sender=VICTIM)
    assert party.server.refused == 4

    survivors = party.server.survivors()
    relabelled = replace(survivors[VICTIM], binding=other).to_bytes()
    with pytest.raises(ProtocolViolation, match="another session"):
        party.clients[VICTIM].consistency(relabelled, sender=SERVER)
    fresh = Carrier()
    fresh.advertise()
    keys = fresh.server.keys()
    with pytest.raises(ProtocolViolation, match="out of order"):
        fresh.clients[VICTIM].consistency(keys[VICTIM].to_bytes(), sender=SERVER)
    wrong_round = fresh.clients[ATTACKER]
    with pytest.raises(ProtocolViolation, match="where a 'keys' message was expected"):
        wrong_round.share_keys(survivors[ATTACKER].to_bytes(), length=LENGTH, sender=SERVER)

"""One colluding node misbehaving where only it is hurt: the aggregator leaves it out (named)
instead of relaying what makes every honest node refuse the round, or abandoning the sum."""

from __future__ import annotations

from dataclasses import replace

import pytest
from masking_parties import SPEC, Party, nodes

from flame.protocols.masking import Binding, ProtocolViolation, Session
from flame.protocols.masking.messages import b64e

BINDING = Binding("ana", 0, "x")


@pytest.mark.parametrize("what", ["equal", "zero-c", "zero-s", "copied"])
def test_the_server_refuses_a_bad_advertisement_and_sums_the_others(what: str) -> None:
    sess = Session(BINDING, nodes(5), 4, SPEC)
    party = Party(sess, length=4)
    first, rogue = sess.participants[0], sess.participants[1]
    honest = party.clients[first].advertise()
    party.server.receive(honest.to_bytes())
    change = {
        "equal": lambda body: {"s_pk": body["c_pk"]},
        "zero-c": lambda body: {"c_pk": b64e(bytes(32))},
        "zero-s": lambda body: {"s_pk": b64e(bytes(32))},
        "copied": lambda body: {"s_pk": honest.body["s_pk"]},
    }[what]
    msg = party.clients[rogue].advertise()
    forged = replace(msg, body={**msg.body, **change(msg.body)}, signature=b"")
    with pytest.raises(ProtocolViolation, match=f"advertise from {rogue!r}"):
        party.server.receive(forged.signed(party.ids[rogue]).to_bytes())
    for v in sess.participants[2:]:
        party.server.receive(party.clients[v].advertise().to_bytes())
    keys = party.server.keys()
    assert set(keys) == set(sess.participants) - {rogue}
    for v, m in keys.items():  # every honest node takes the round
        reply = party.clients[v].share_keys(m.to_bytes(), length=4)
        party.server.receive(reply.to_bytes())
    assert set(party.server.ciphertexts()) == set(sess.participants) - {rogue}

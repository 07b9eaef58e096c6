"""A colluding node seals, with the real key of the pair, a share plaintext that parses to
no share (an integer of 5,000 digits, lists nested 100,000 deep). Its recipient must refuse
it as malformed from that sender (ProtocolViolation), never raise ValueError or
RecursionError into the node's runtime."""

from __future__ import annotations

import pytest
from masking_parties import SPEC, Party, nodes

from flame.protocols.masking import Binding, ProtocolViolation, Session
from flame.protocols.masking.agreement import seal_share
from flame.protocols.masking.messages import b64e


@pytest.mark.parametrize(
    "plaintext",
    [b'{"s": ' + b"7" * 5000 + b', "b": "1"}', b"[" * 100_000 + b"]" * 100_000],
    ids=["5000-digit-int", "nested-100000-deep"],
)
def test_a_share_that_parses_to_no_share_is_refused_naming_its_sender(plaintext: bytes) -> None:
    members = nodes(4)
    party = Party(Session(Binding("ana", 0, "x"), members, 3, SPEC), length=5)
    party.share_keys()
    rogue, victim = members[0], members[1]
    honest = party.server.ciphertexts()[victim]
    sender = party.clients[rogue]
    sealed = seal_share(
        sender._share_keys[victim],
        sender._u1[victim][0],
        sender._context,
        rogue,
        victim,
        plaintext,
    )
    body = {**honest.body, "from": {**honest.body["from"], rogue: b64e(sealed)}}
    with pytest.raises(ProtocolViolation, match=f"shares from {rogue!r} are malformed"):
        party.clients[victim].masked_input(party.forge("ciphertexts", body), party.values[victim])

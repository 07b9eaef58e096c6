"""One colluding node misbehaving where only it is hurt: the aggregator leaves it out (named)
instead of relaying what makes every honest node refuse the round, or abandoning the sum."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from masking_parties import SPEC, Party, nodes

from flame.protocols.masking import Binding, MaskingError, ProtocolViolation, Session
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


def _through_reveal(party: Party, alter: str | None) -> tuple[dict[str, Any], Any]:
    """Rounds 2-4, honestly, except that `alter` reveals shares off the polynomial."""
    sess = party.sess
    for v, m in party.server.ciphertexts().items():
        masked = party.clients[v].masked_input(m.to_bytes(), party.values[v])
        party.server.receive(masked.to_bytes())
    for v, m in party.server.survivors().items():
        party.server.receive(party.clients[v].consistency(m.to_bytes()).to_bytes())
    for v, m in party.server.unmask().items():
        reveal = party.clients[v].reveal(m.to_bytes())
        if v == alter:
            body = {k: dict.fromkeys(part, "1") for k, part in reveal.body.items()}
            reveal = replace(reveal, body=body, signature=b"").signed(party.ids[v])
        party.server.receive(reveal.to_bytes())
    return party.values, sess


@pytest.mark.parametrize("n", [5, 7])
def test_altered_reveals_are_left_out_and_the_sum_stands(n: int) -> None:
    """The shares of one revealer lie on no polynomial with the others': each secret is
    rebuilt from the others, checked against its commitment, and the revealer is named."""
    sess = Session(BINDING, nodes(n), n // 2 + 2, SPEC)
    party = Party(sess, length=4)
    party.share_keys()
    rogue = sess.participants[1]
    values, _ = _through_reveal(party, rogue)
    total = party.server.result()
    assert total.contributors == sess.participants
    expected = sum(np.rint(values[v] * 2**16).astype(np.int64) for v in sess.participants)
    assert np.array_equal(total.encoded, expected)
    assert party.server.bad_revealers == {rogue}


def test_a_reveal_of_altered_shares_by_too_many_still_refuses() -> None:
    """With fewer than t_k good shares of a secret nothing is rebuilt: the sum is refused."""
    sess = Session(BINDING, nodes(5), 4, SPEC)
    party = Party(sess, length=4)
    party.share_keys()
    _through_reveal(party, sess.participants[1])
    party.server._reveals[sess.participants[2]] = party.server._reveals[sess.participants[1]]
    with pytest.raises(MaskingError, match="no 4 of the 5 revealed shares rebuild it"):
        party.server.result()


def test_an_aggregate_reading_a_field_too_few_nodes_sealed_is_told_why() -> None:
    """In `flame simulate` (roster, every envelope signed) one node seals a field "y" the
    others do not: "x" is summed, "y" is not, and an `aggregate` that reads
    results.secure["y"] fails naming the field and why, not with a bare KeyError."""
    import flame
    from flame.config import load_config
    from flame.errors import RunFailed
    from flame.testing import MemoryBroker

    members = ("node-a", "node-b", "node-c", "node-d")

    def analyze(data: Any, epoch: int, previous: Any) -> dict[str, Any]:
        out = {"x": flame.secure(np.ones(3))}
        if data.node_id == "node-a":
            out["y"] = flame.secure(np.ones(3))
        return out

    def aggregate(results: Any, epoch: int, previous: Any) -> Any:
        return {"x": results.secure["x"], "y": results.secure["y"]}

    config = load_config(
        secure={"enabled": True, "scheme": "masking", "bound": 1024.0},
        epoch_timeout=30,
        presence_timeout=30,
    )
    with pytest.raises(RunFailed) as caught:
        flame.simulate(
            analyze,
            aggregate,
            data={v: {"v.csv": "v\n1\n"} for v in members},
            config=config,
            broker=MemoryBroker(),
        )
    text = str(caught.value)
    assert "aggregate failed in epoch 0" in text and "KeyError" in text
    assert "'y' was not summed this epoch" in text and "results.contributors['y']" in text


def test_other_key_errors_in_aggregate_get_no_such_hint() -> None:
    from flame.aggregator.server import _unsummed_hint
    from flame.secure.marked import Results

    results = Results({}, {"x": np.ones(2)}, {"x": ["node-a", "node-b"], "y": []})
    assert _unsummed_hint(KeyError("y"), results).startswith(" (the secure field 'y'")
    assert _unsummed_hint(KeyError("x"), results) == ""  # summed: the analysis's own error
    assert _unsummed_hint(KeyError("column"), results) == ""  # not a secure field
    assert _unsummed_hint(ValueError("y"), results) == ""
    assert _unsummed_hint(KeyError("y"), {"node-a": {}}) == ""  # plain results

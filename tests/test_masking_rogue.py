"""One colluding node misbehaving where only it is hurt: the aggregator leaves it out (named)
instead of relaying what makes every honest node refuse the round, or abandoning the sum."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from masking_parties import SPEC, Party, Run, nodes

from flame.errors import RunFailed
from flame.protocols.masking import Binding, MaskingError, Message, ProtocolViolation, Session
from flame.protocols.masking.messages import b64e
from flame.wire.envelope import Sealed

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


# --- in a run: a result the aggregator cannot take for one field --------------------------

MEMBERS = ("n0", "n1", "n2", "n3", "n4")  # t = 4 (floor(2n/3) + 1)
ROGUE = "n1"
HONEST = tuple(v for v in MEMBERS if v != ROGUE)
VALUES = {v: np.random.default_rng(11).uniform(-100, 100, 6) + i for i, v in enumerate(MEMBERS)}


def _exact(members: tuple[str, ...]) -> Any:
    return sum(np.rint(VALUES[v] * 2**16).astype(np.int64) for v in members) / 2**16


def _advert(**change: Any) -> Callable[[Run, Sealed], Sealed]:
    """The rogue's own advertisement of "x" with `change` in its body, signed by itself."""

    def forge(run: Run, sealed: Sealed) -> Sealed:
        ad = Message.from_bytes(sealed.data)
        forged = replace(ad, body={**ad.body, **change}, signature=b"")
        return Sealed("masking", forged.signed(run.auths[ROGUE].identity.key).to_bytes())

    return forge


ROGUE_RESULTS: dict[str, Callable[[Run, Sealed], Sealed]] = {
    "paillier-scheme": lambda run, sealed: Sealed("paillier", b"\x00" * 64),
    "unknown-scheme": lambda run, sealed: Sealed("x" * 32, sealed.data),
    "not-a-message": lambda run, sealed: Sealed("masking", b"no masking message"),
    "empty": lambda run, sealed: Sealed("masking", b""),
    "no-shape": _advert(shape="3x2"),
    "negative-shape": _advert(shape=[-6]),
    "list-precision": _advert(precision=[16]),
    "bool-precision": _advert(precision=True),
    "text-bound": _advert(bound="1024"),
    "nan-bound": _advert(bound=float("nan")),
    "huge-bound": _advert(bound=10**400),
}


@pytest.mark.parametrize("what", sorted(ROGUE_RESULTS))
def test_a_result_of_another_scheme_or_no_valid_advertisement_leaves_one_node_out(
    what: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One node's "x" is sealed with another scheme (a node left on paillier, by mistake or
    not) or is no masking advertisement of a valid encoding: that node is left out of the
    sum, named in the refusals and logged (no key material, no values), and the sum of the
    t others stands. Before: RunFailed (a TypeError for a list precision) for the epoch."""
    run = Run(MEMBERS, VALUES)
    results = run.sealed()
    results[ROGUE] = {"x": ROGUE_RESULTS[what](run, results[ROGUE]["x"])}
    with caplog.at_level(logging.WARNING, logger="flame.secure.masking_sum"):
        out, summer = run.run(results)
    assert out.contributors["x"] == list(HONEST)
    assert np.array_equal(out.secure["x"], _exact(HONEST))
    assert set(summer.refusals) == {ROGUE} and "'x'" in summer.refusals[ROGUE]
    logged = [r.getMessage() for r in caplog.records if ROGUE in r.getMessage()]
    assert logged and all(len(m) < 400 for m in logged)
    assert not any(pk in m for m in logged for pk in ("c_pk", "s_pk", "xxxxxxxxxxxxxxxxxxxxx"))
    if what.endswith("scheme"):
        assert "FLAME_SECURE__SCHEME=masking" in summer.refusals[ROGUE]


def test_a_wrong_scheme_from_all_but_fewer_than_t_is_a_misconfiguration() -> None:
    """Two of five nodes on paillier leave three masked results, fewer than t = 4: the
    epoch fails naming both and telling the user to set the scheme on every node."""
    run = Run(MEMBERS, VALUES)
    results = run.sealed()
    for v in ("n3", "n1"):
        results[v] = {"x": Sealed("paillier", b"\x00" * 64)}
    with pytest.raises(RunFailed) as caught:
        run.run(results)
    text = str(caught.value)
    assert "'n1', 'n3'" in text and "'paillier'" in text
    assert "every node needs FLAME_SECURE__SCHEME=masking" in text


def test_a_wrong_scheme_from_every_node_says_how_to_fix_it() -> None:
    run = Run(MEMBERS, VALUES)
    results = {v: {"x": Sealed("paillier", b"\x00" * 64)} for v in MEMBERS}
    with pytest.raises(RunFailed, match="every node needs FLAME_SECURE__SCHEME=masking"):
        run.run(results)


def test_too_few_valid_advertisements_fail_naming_the_refused_nodes() -> None:
    """Two unparsable advertisements of five leave three, fewer than t = 4: the sum fails
    as before (never a sum of fewer than t), and the failure names both refused nodes."""
    run = Run(MEMBERS, VALUES)
    results = run.sealed()
    for v in ("n1", "n3"):
        results[v] = {"x": Sealed("masking", b"no masking message")}
    with pytest.raises(RunFailed) as caught:
        run.run(results)
    text = str(caught.value)
    assert "Refused by: n1 (advertise:" in text and "; n3 (advertise:" in text


def test_no_valid_advertisement_at_all_fails_saying_so() -> None:
    run = Run(MEMBERS, VALUES)
    results = {v: {"x": Sealed("masking", b"no masking message")} for v in MEMBERS}
    with pytest.raises(RunFailed) as caught:
        run.run(results)
    text = str(caught.value)
    assert "no node sent a valid advertisement" in text and "n4 (advertise: its 'x' is" in text


def test_in_flame_simulate_a_node_left_on_another_scheme_is_left_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """End to end (roster, signed envelopes): one node's sealed "x" has another scheme, as
    from a node left on FLAME_SECURE__SCHEME=paillier. The run ends with the others' sum,
    the node is absent from the contributors, and the aggregator's warning says why."""
    import flame
    from flame.config import load_config
    from flame.secure.masking import MaskingNode
    from flame.testing import MemoryBroker

    seal = MaskingNode.seal

    def rogue(self: MaskingNode, result: Any, epoch: int, run: str | None = None) -> Any:
        out = seal(self, result, epoch, run)
        return {"x": Sealed("paillier", b"\x00" * 64)} if self.node_id == ROGUE else out

    monkeypatch.setattr(MaskingNode, "seal", rogue)
    config = load_config(
        secure={"enabled": True, "scheme": "masking", "bound": 1024.0},
        epoch_timeout=30,
        presence_timeout=30,
    )
    with caplog.at_level(logging.WARNING, logger="flame.secure.masking_sum"):
        result = flame.simulate(
            lambda data, epoch, previous: {"x": flame.secure(VALUES[data.node_id])},
            lambda results, epoch, previous: (results.secure["x"], results.contributors["x"]),
            data={v: {"v.csv": "v\n1\n"} for v in MEMBERS},
            config=config,
            broker=MemoryBroker(),
        )
    total, who = result.value
    assert who == list(HONEST) and np.array_equal(total, _exact(HONEST))
    assert any(
        f"left {ROGUE} out" in r.getMessage() and "FLAME_SECURE__SCHEME=masking" in r.getMessage()
        for r in caplog.records
    )

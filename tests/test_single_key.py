"""The single-key decrypter's checks (flame.secure.single_key): real keys, real signatures.

The attacks over a real broker are in test_attacks_single_key; here each refusal is shown
directly, including across a restart (the ledger in node-local state).
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from flame.aggregator.run_store import MemoryState
from flame.config import load_config
from flame.identity import Identity, Member, Roster
from flame.protocols.paillier import encrypt_vector, generate_keypair
from flame.protocols.paillier.keys import key_id
from flame.secure.fields import SecureKeys, answer_vectors
from flame.secure.single_key import SingleKeyDecrypter, sign_contribution
from flame.secure.unanimous import endorsement_message, pairs_of
from flame.wire.envelope import Envelope, Sealed

NODES = ["alpha", "beta", "gamma"]
ANALYSIS = "s"
VALUES = {"alpha": 1.5, "beta": 20.0, "gamma": 300.0}


@pytest.fixture(scope="module")
def world() -> dict[str, Any]:
    public, private = generate_keypair(1024, allow_insecure=True)
    ids = {n: Identity.generate(n) for n in ["aggregator", *NODES, "zed"]}
    roles = {n: "analysis" for n in [*NODES, "zed"]}
    roster = Roster(
        [Member("aggregator", "aggregation", ids["aggregator"].public_text)]
        + [Member(n, roles[n], ids[n].public_text) for n in roles]
    )
    spec = SecureKeys.spec_of(load_config().secure)
    return {"public": public, "private": private, "ids": ids, "roster": roster, "spec": spec}


def _keys(world: dict[str, Any], node: str, **changes: Any) -> SecureKeys:
    keys = SecureKeys(world["public"], world["private"], world["spec"], 2, **changes)
    keys.signer = world["ids"][node].sign
    keys.verifier = world["roster"].verifier("analysis")
    return keys


def _contributions(world: dict[str, Any], epoch: int, nodes: list[str]) -> dict[str, Sealed]:
    out = {}
    for node in nodes:
        vector = encrypt_vector(VALUES[node], world["public"], world["spec"], field="total")
        sign = world["ids"][node].sign
        out[node] = sign_contribution(vector.to_bytes(), sign, "total", (ANALYSIS, epoch, node))
    return out


def _decrypter(world: dict[str, Any], state: Any = None, **changes: Any) -> SingleKeyDecrypter:
    members = frozenset(world["roster"].ids("analysis"))
    keys = _keys(world, "alpha", **changes)
    return SingleKeyDecrypter(keys, "alpha", ANALYSIS, members, state or MemoryState())


def _endorsed(world: dict[str, Any], epoch: int, sealed: dict[str, Sealed]) -> dict[str, str]:
    """Every contributor's endorsement of this set, signed with its identity."""
    message = endorsement_message(
        key_id(world["public"]), ANALYSIS, epoch, "total", pairs_of(sealed)
    )
    return {node: world["ids"][node].sign(message).hex() for node in sealed}


def _request(
    epoch: int, contributions: dict[str, Any], endorsements: Any = None, **body: Any
) -> Envelope:
    payload = {
        "contributions": {"total": contributions},
        "endorsements": {"total": endorsements},
        **body,
    }
    return Envelope(ANALYSIS, "aggregator", "alpha", "message", epoch, payload)


def _ask(world: dict[str, Any], d: SingleKeyDecrypter, epoch: int, sealed: dict[str, Sealed]):  # type: ignore[no-untyped-def]
    return d.answer(_request(epoch, sealed, _endorsed(world, epoch, sealed)))


def _endorse(d: SingleKeyDecrypter, epoch: int, sealed: dict[str, Sealed]) -> dict[str, Any]:
    digests = {n: hashlib.sha256(bytes(s.data)).hexdigest() for n, s in sealed.items()}
    body = {"digests": {"total": digests}}
    return d.endorse(Envelope(ANALYSIS, "aggregator", "alpha", "message", epoch, body))


def _round(
    world: dict[str, Any], d: SingleKeyDecrypter, epoch: int, nodes: list[str]
) -> tuple[dict[str, Sealed], dict[str, Any]]:
    """alpha sends its contribution in `epoch`, endorses the set over `nodes`, then is asked
    for its sum (with everyone's endorsements)."""
    sealed = _contributions(world, epoch, nodes)
    d.sent(epoch, {"total": sealed["alpha"]}, {})
    endorsed = _endorse(d, epoch, sealed)
    if "error" in endorsed:
        return sealed, endorsed
    return sealed, _ask(world, d, epoch, sealed)


def test_the_sum_of_signed_contributions_is_decrypted(world: dict[str, Any]) -> None:
    d = _decrypter(world)
    _, reply = _round(world, d, 0, NODES)
    assert float(reply["sums"]["total"]) == pytest.approx(321.5)


def test_a_second_set_in_the_analysis_is_refused_across_restarts(world: dict[str, Any]) -> None:
    state = MemoryState()
    d = _decrypter(world, state)
    _, reply = _round(world, d, 0, NODES)
    assert "sums" in reply
    restarted = _decrypter(world, state)  # a new process on the same node-local state
    _, reply = _round(world, restarted, 1, ["alpha", "beta"])
    assert "FLAME_SECURE__ALLOW_CHANGING_CONTRIBUTORS" in reply["error"], reply
    _, reply = _round(world, restarted, 1, NODES)  # the fixed set: fine
    assert float(reply["sums"]["total"]) == pytest.approx(321.5)
    lifted = _decrypter(world, MemoryState(), allow_changing_contributors=True)
    _round(world, lifted, 0, NODES)
    _, reply = _round(world, lifted, 1, ["alpha", "beta"])
    assert float(reply["sums"]["total"]) == pytest.approx(21.5)


def test_one_sum_per_epoch_and_field(world: dict[str, Any]) -> None:
    d = _decrypter(world, allow_changing_contributors=True)
    sealed, first = _round(world, d, 0, NODES)
    assert "sums" in first
    again = _ask(world, d, 0, sealed)  # the same sum again (a re-sent request): fine
    assert "sums" in again
    fewer = {n: sealed[n] for n in ("alpha", "beta")}
    assert "endorsed a different contribution set" in _endorse(d, 0, fewer)["error"]
    reply = _ask(world, d, 0, fewer)  # even with everyone's endorsements (say, forged ones)
    assert "already answered a decryption request for 'total'" in reply["error"]


def test_every_contributor_must_endorse_the_set(world: dict[str, Any]) -> None:
    d = _decrypter(world)
    sealed = _contributions(world, 0, NODES)
    d.sent(0, {"total": sealed["alpha"]}, {})
    assert "carries no endorsements" in d.answer(_request(0, sealed))["error"]
    partial = _endorsed(world, 0, sealed)
    del partial["gamma"]
    reply = d.answer(_request(0, sealed, partial))
    assert "no valid endorsement of 'gamma'" in reply["error"], reply
    other = _endorsed(world, 0, {n: sealed[n] for n in ("alpha", "beta")})  # another set's
    reply = d.answer(_request(0, sealed, {**_endorsed(world, 0, sealed), "beta": other["beta"]}))
    assert "no valid endorsement of 'beta'" in reply["error"], reply
    assert "sums" in _ask(world, d, 0, sealed)


def test_forged_relabelled_or_foreign_contributions_are_refused(world: dict[str, Any]) -> None:
    d = _decrypter(world)
    sealed = _contributions(world, 0, NODES)
    d.sent(0, {"total": sealed["alpha"]}, {})
    renamed = {"alpha": sealed["alpha"], "gamma": sealed["beta"]}  # beta's under gamma's name
    assert "signature" in _ask(world, d, 0, renamed)["error"]
    without_own = {"beta": sealed["beta"], "gamma": sealed["gamma"]}
    assert "did not add" in d.answer(_request(0, without_own))["error"]
    assert "did not add" in _endorse(d, 0, without_own)["error"]
    other = _contributions(world, 0, ["alpha"])["alpha"]  # alpha's, but not the one it sent
    mine = {"alpha": other, "beta": sealed["beta"]}
    assert "not the one it sent" in d.answer(_request(0, mine))["error"]
    assert "other than the one it sent" in _endorse(d, 0, mine)["error"]
    stranger = {"alpha": sealed["alpha"], "omega": sealed["beta"]}  # not in the roster
    assert "not analysis members of the roster: omega" in d.answer(_request(0, stranger))["error"]
    assert "not analysis members of the roster: omega" in _endorse(d, 0, stranger)["error"]
    total = Sealed("paillier", b"x")
    bare = Envelope(ANALYSIS, "aggregator", "alpha", "message", 0,
                    {"sums": {"total": total}, "contributors": {"total": NODES}})  # fmt: skip
    assert "re-adds from signed contributions" in d.answer(bare)["error"]
    assert "no result of this node in epoch 5" in d.answer(_request(5, sealed))["error"]


def test_a_lone_vector_claiming_two_contributions_is_refused(world: dict[str, Any]) -> None:
    from flame.protocols.paillier import EncryptedVector
    from flame.secure.contributions import unpack_contribution

    d = _decrypter(world)
    sealed = _contributions(world, 0, NODES)
    d.sent(0, {"total": sealed["alpha"]}, {})
    _, body = unpack_contribution(bytes(sealed["beta"].data))
    vector = EncryptedVector.from_bytes(body, world["public"])
    vector.contributors = 2
    two = sign_contribution(
        vector.to_bytes(), world["ids"]["beta"].sign, "total", (ANALYSIS, 0, "beta")
    )
    reply = _ask(world, d, 0, {"alpha": sealed["alpha"], "beta": two})
    assert "claims to hold 2 contributions" in reply["error"]
    assert answer_vectors  # the shared decrypt/confirm step is importable for patches

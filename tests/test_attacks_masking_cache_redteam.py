"""Red team on the masking parse cache, the shared server messages, the leave-out logic of
`MaskingSummer._open` and the wire encoder's fast paths (commits 34b8d03..0db3b9e).

Failing tests are attacks that work on the code as it is (each asserts the secure
behaviour); passing tests pin the defences that held. Seats: a broker operator (no roster
key), a malicious aggregator, one colluding node (its own roster key), and, for the
in-process simulation only, another party in the same process.
"""

from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from masking_parties import SPEC, Party, Run, nodes

from flame.errors import RunFailed
from flame.protocols.masking import Binding, Message, ProtocolViolation, Session, messages
from flame.protocols.masking.messages import b64e, open_message
from flame.secure.masking import MaskingNode
from flame.secure.masking_sum import MaskingSummer
from flame.wire.envelope import Envelope, Sealed, decode, encode

MEMBERS = ("n0", "n1", "n2", "n3", "n4")  # t = 4
ROGUE = "n1"
HONEST = tuple(v for v in MEMBERS if v != ROGUE)
VALUES = {v: np.random.default_rng(7).uniform(-100, 100, 6) + i for i, v in enumerate(MEMBERS)}


def _exact(members: Any) -> Any:
    return sum(np.rint(VALUES[v] * 2**16).astype(np.int64) for v in members) / 2**16


def _raw(header: bytes) -> bytes:
    """Masking wire bytes around `header` as given (no vector, no signature)."""
    return struct.pack(">4sBI", b"FLMK", 1, len(header)) + header + struct.pack(">Q", 0) + b"\0"


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _signed_advert(run: Run, sealed: Sealed, **extra: Any) -> Sealed:
    """The rogue's own, valid advertisement of "x" with `extra` keys, signed by itself."""
    ad = Message.from_bytes(sealed.data)
    forged = replace(ad, body={**ad.body, **extra}, signature=b"")
    return Sealed("masking", forged.signed(run.auths[ROGUE].identity.key).to_bytes())


def _assert_sum_of_its_contributors(out: Any) -> None:
    contributors = out.contributors["x"]
    assert set(HONEST) <= set(contributors)
    assert np.array_equal(out.secure["x"], _exact(contributors))


# --- crashes of the aggregator's epoch from one node's bytes ---------------------------------


def test_a_deeply_nested_signed_advertisement_does_not_crash_the_aggregator() -> None:
    """ATTACK (one colluding node): its advertisement of "x" is valid (shape, precision,
    bound, keys, its own signature) plus one extra body key nested 600 lists deep. json.loads
    takes it (one C level per list), and before the parse cache the node simply took part.
    Now `_Parsed.parse` rebuilds the body read-only with `_frozen`, two Python frames per
    level (messages.py `_frozen`, called from `_Parsed.parse` before any signature check):
    RecursionError out of `server.receive` in `MaskingSummer._open`, which catches only
    ProtocolViolation. The aggregator's epoch dies with a RecursionError that names no node:
    one node stops every masked sum, where the leave-out logic promises to name and drop it.
    The same body in a consistency signature or peers statement crashes the later rounds.
    Fixed: `Message.from_bytes` refuses a header nesting deeper than 16 (ProtocolViolation),
    and the cache gives readers copies made by a walk of that bounded depth."""
    run = Run(MEMBERS, VALUES)
    results = run.sealed()
    results[ROGUE] = {"x": _signed_advert(run, results[ROGUE]["x"], pad=_nested(600))}
    out, _ = run.run(results)
    _assert_sum_of_its_contributors(out)


@pytest.mark.parametrize("round", ["advertise", "consistency", "peers"])
def test_a_deeply_nested_forwarded_message_is_refused_not_a_recursion_error(round: str) -> None:
    """ATTACK (one colluding node / malicious aggregator towards a node): any forwarded
    message with a body nested a few hundred levels deep, signed or not. open_message parses
    it through the cache and `_frozen` recurses past the interpreter's limit before the
    signature is checked: RecursionError instead of ProtocolViolation (every caller, the
    server's `receive` and the client's `share_keys`/`reveal`, catches only the latter)."""
    key = Ed25519PrivateKey.generate()
    binding = Binding("ana", 0, "x")
    data = Message(binding, round, "n1", {"pad": _nested(600)}).signed(key).to_bytes()
    with contextlib.suppress(ProtocolViolation):  # a refusal is fine; RecursionError is not
        open_message(data, binding=binding, round=round, keys={"n1": key.public_key()})


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b'{"epoch":' + b"1" * 5000 + b"}", id="5000-digit-int"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-100000-deep"),
    ],
)
def test_an_unparsable_advertisement_leaves_its_node_out_not_the_epoch_crashed(
    header: bytes,
) -> None:
    """ATTACK (one colluding node): its sealed "x" is masking wire bytes whose JSON header is
    a 5000-digit integer (ValueError: int max str digits) or 100,000 nested lists
    (RecursionError in json.loads). `Message.from_bytes` converts only UnicodeDecodeError and
    JSONDecodeError to ProtocolViolation (messages.py, `from_bytes`), and the new
    `_encoding` (masking_sum.py) catches only FlameError: the exception leaves `_open` and
    the epoch fails with no node named, though `_encoding` claims to leave out a node whose
    advertisement "is malformed". Pre-existing in the parse, still open in the new leave-out
    code."""
    run = Run(MEMBERS, VALUES)
    results = run.sealed()
    results[ROGUE] = {"x": Sealed("masking", _raw(header))}
    out, summer = run.run(results)
    assert out.contributors["x"] == list(HONEST)
    assert np.array_equal(out.secure["x"], _exact(HONEST))
    assert set(summer.refusals) == {ROGUE}


def test_an_unparsable_reply_in_a_later_round_is_refused_not_a_crash() -> None:
    """ATTACK (one colluding node): it answers the "keys" round with masking bytes whose
    header is a 5000-digit integer. `server.receive` in `MaskingSummer._round` catches only
    ProtocolViolation; `open_message` -> `_Parsed.parse` -> `Message.from_bytes` raises
    ValueError: the epoch dies instead of the node dropping out of U2 (the other four are
    still t = 4)."""

    def tamper(step: str, replies: dict[str, Any]) -> None:
        if step == "keys":
            bad = _raw(b'{"epoch":' + b"9" * 5000 + b"}")
            replies[ROGUE] = {"messages": {"x": Sealed("masking", bad)}}

    run = Run(MEMBERS, VALUES, tamper)
    out, summer = run.run()
    assert out.contributors["x"] == list(HONEST)
    assert np.array_equal(out.secure["x"], _exact(HONEST))
    assert ROGUE in summer.refusals


# --- the read-only body of a cached parse ----------------------------------------------------


@pytest.mark.parametrize("path", ["dict.__init__", "list.__init__"])
def test_a_cached_body_cannot_be_rewritten_under_its_cached_digest(path: str) -> None:
    """ATTACK (another party in the same process, in-process simulation only): `_FrozenDict`
    and `_FrozenList` refuse the mutators they list but not `__init__`, which refills a
    dict or list in place (messages.py `_FrozenDict`/`_FrozenList`). The rewritten body is
    the one the cache hands every later reader of those bytes, WITH the digest of the
    original body: `_verify` checks the signature against that stale digest and passes, so
    a reader acts on keys (or a survivor list) the signer never signed. Needs code running
    in the simulation's process; the freezing was meant to make exactly this impossible.
    Fixed: the kept body is never handed out; every reader gets a copy of its own."""
    key = Ed25519PrivateKey.generate()
    binding = Binding("ana", 3, "x", "runx")
    body = {"c_pk": b64e(bytes(32)), "s_pk": b64e(bytes([1]) * 32), "u3": ["n1", "n2"]}
    data = Message(binding, "advertise", "n1", body).signed(key).to_bytes()
    keys = {"n1": key.public_key()}
    first = open_message(data, binding=binding, round="advertise", keys=keys, senders={"n1"})
    try:
        if path == "dict.__init__":
            first.body.__init__(c_pk=b64e(bytes([9]) * 32))  # type: ignore[misc]
        else:
            first.body["u3"].__init__(["n9"])
    except TypeError:
        pass  # refused: the defence holds
    try:
        second = open_message(data, binding=binding, round="advertise", keys=keys)
    except ProtocolViolation:
        return  # refused as tampered: fine too
    assert second.body == Message.from_bytes(data).body


def test_changes_to_a_cached_body_stay_with_their_reader() -> None:
    """REFUSED (in-process reader): |=, +=, *=, slice and item assignment on the body one
    reader got, and copies (dict(), .copy(), copy.copy, a json round trip), stay with that
    reader; the next reader of the same bytes sees the signed body."""
    import copy

    key = Ed25519PrivateKey.generate()
    binding = Binding("ana", 3, "x", "runy")
    body = {"keys": "k" * 44, "u3": ["n1", "n2"], "nested": {"a": [1, {"b": 2}]}}
    data = Message(binding, "consistency", "n1", body).signed(key).to_bytes()
    keys = {"n1": key.public_key()}
    got = open_message(data, binding=binding, round="consistency", keys=keys).body
    u3, nested = got["u3"], got["nested"]
    for change in (  # each reader's body is its own: a change stays with it
        lambda: got.__ior__({"u3": []}),
        lambda: u3.__iadd__(["n9"]),
        lambda: u3.__imul__(0),
        lambda: u3.__setitem__(slice(0, 2), ["n9"]),
        lambda: u3.__delitem__(slice(None)),
        lambda: nested["a"][1].__setitem__("b", 3),
        lambda: nested.setdefault("c", 1),
    ):
        change()
    for private in (dict(got), got.copy(), copy.copy(got), json.loads(json.dumps(got))):
        private["u3"] = ["n9"]
    again = open_message(data, binding=binding, round="consistency", keys=keys)
    assert again.body == body


# --- a cached parse taken elsewhere -----------------------------------------------------------


@pytest.mark.parametrize("where", ["next-epoch", "another-run"])
def test_a_cached_advertisement_replayed_into_another_session_leaves_its_node_out(
    where: str,
) -> None:
    """REFUSED (colluding node or aggregator replaying): the rogue's advertisement, opened
    and kept in the parse cache by the epoch-0 sum, is handed in again for epoch 1 (or in a
    run restarted under another id). The cache returns the parse, but the binding check
    still runs: the rogue is left out, the honest sum stands."""
    run = Run(MEMBERS, VALUES)
    old = run.sealed()
    first = MaskingSummer(run.settings, 5.0, run, run.members, run.auths["agg"])  # type: ignore[arg-type]
    if where == "another-run":
        first.run_id = "run-a"
        old = {v: n.seal({"x": _flame_secure(VALUES[v])}, 0, "run-a") for v, n in run.nodes.items()}
    first(old, 0)
    replayed = old[ROGUE]["x"]
    assert replayed.data in messages._PARSED._seen  # the attack needs the cached parse
    epoch, run_id = (1, None) if where == "next-epoch" else (0, "run-b")
    run.nodes = {  # the same identities; fresh nodes, whose guard has not signed a U3 yet
        v: MaskingNode(run.settings, "ana", v, run.members, "agg", run.auths[v]) for v in MEMBERS
    }
    results = {
        v: n.seal({"x": _flame_secure(VALUES[v])}, epoch, run_id) for v, n in run.nodes.items()
    }
    results[ROGUE] = {"x": replayed}
    summer = MaskingSummer(run.settings, 5.0, run, run.members, run.auths["agg"])  # type: ignore[arg-type]
    summer.run_id = run_id
    out = summer(results, epoch)
    assert out.contributors["x"] == list(HONEST)
    assert np.array_equal(out.secure["x"], _exact(HONEST))
    assert "another session" in summer.refusals[ROGUE]


def _flame_secure(values: Any) -> Any:
    import flame

    return flame.secure(values)


def test_a_cached_signature_does_not_vouch_for_a_relabelled_copy() -> None:
    """REFUSED (broker operator / aggregator): after a genuine advertisement of n1 is kept,
    copies with another sender, field, epoch, run, round or body keep its signature. Each is
    other bytes, so no cache hit, and its digest is recomputed: bad signature (or the wrong
    session / round) every time, also when n2 holds a key in the roster."""
    k1, k2 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    binding = Binding("ana", 3, "x", "runz")
    body = {"c_pk": b64e(bytes(32)), "s_pk": b64e(bytes([1]) * 32)}
    genuine = Message(binding, "advertise", "n1", body).signed(k1)
    keys = {"n1": k1.public_key(), "n2": k2.public_key()}
    open_message(genuine.to_bytes(), binding=binding, round="advertise", keys=keys)
    for copy_ in (
        replace(genuine, sender="n2"),
        replace(genuine, body={**body, "c_pk": b64e(bytes([7]) * 32)}),
        replace(genuine, round="consistency"),
    ):
        with pytest.raises(ProtocolViolation, match="bad signature"):
            open_message(copy_.to_bytes(), binding=binding, round=copy_.round, keys=keys)
    for other in (
        Binding("ana", 4, "x", "runz"),
        Binding("ana", 3, "y", "runz"),
        Binding("ana", 3, "x", "run2"),
    ):
        moved = replace(genuine, binding=other)
        with pytest.raises(ProtocolViolation, match="bad signature"):
            open_message(moved.to_bytes(), binding=other, round="advertise", keys=keys)


def test_filling_and_evicting_the_cache_changes_no_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    """REFUSED (whoever can make a process open many valid messages): the cache keeps only
    messages that passed every check, and an evicted one is parsed and checked again. A
    forged copy is refused while the genuine one is cached, after it was evicted, and when
    the cache is full of others."""
    monkeypatch.setattr(messages, "_PARSED", messages._Parsed(4))
    key, forger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    binding = Binding("ana", 0, "x")
    keys = {f"n{i}": key.public_key() for i in range(20)}

    def advert(sender: str, signer: Ed25519PrivateKey, c: int = 0) -> bytes:
        body = {"c_pk": b64e(bytes([c]) * 32), "s_pk": b64e(bytes([1]) * 32)}
        return Message(binding, "advertise", sender, body).signed(signer).to_bytes()

    genuine, forged = advert("n0", key), advert("n0", forger)
    for step in range(3):
        assert open_message(genuine, binding=binding, round="advertise", keys=keys).sender == "n0"
        with pytest.raises(ProtocolViolation, match="bad signature"):
            open_message(forged, binding=binding, round="advertise", keys=keys)
        for i in range(1, 10):  # fill: evicts the genuine one
            open_message(advert(f"n{i}", key, step), binding=binding, round="advertise", keys=keys)
        assert genuine not in messages._PARSED._seen and forged not in messages._PARSED._seen


# --- the shared "keys" / "survivors" messages -------------------------------------------------


def test_on_a_sparse_graph_every_node_gets_exactly_its_holders_adverts() -> None:
    """REFUSED (a per-recipient difference vanishing): 100 nodes (sparse graph, k = 42), six
    of them never advertise. The server builds one "keys" message per holder set; each node's
    message carries exactly the adverts of U1 among its holders (none of another node's
    neighbourhood), two nodes share a message object only when those sets are equal, and
    every node takes its message."""
    sess = Session(Binding("ana", 0, "x"), nodes(100), 67, SPEC)
    assert sess.graph.sparse
    party = Party(sess, length=1)
    silent = set(sess.participants[::17])
    for v, c in party.clients.items():
        if v not in silent:
            party.server.receive(c.advertise().to_bytes())
    keys = party.server.keys()
    u1 = set(sess.participants) - silent
    assert set(keys) == u1
    seen: dict[int, frozenset[str]] = {}
    for v, msg in keys.items():
        shown = frozenset(msg.body["adverts"])
        assert shown == u1 & sess.holders(v)
        assert seen.setdefault(id(msg), shown) == shown
    for v in sorted(u1)[:5]:
        party.clients[v].share_keys(keys[v].to_bytes(), length=1)


def test_a_shared_survivors_message_reaches_every_survivor_with_one_u3() -> None:
    """REFUSED: the one "survivors" message every node of U3 gets names the same U3 the
    server later checks the consistency signatures against; a node that changes its copy
    (it only gets bytes) cannot change another's."""
    sess = Session(Binding("ana", 0, "x"), nodes(5), 4, SPEC)
    party = Party(sess, length=2)
    party.share_keys()
    for v, m in party.server.ciphertexts().items():
        party.server.receive(
            party.clients[v].masked_input(m.to_bytes(), party.values[v]).to_bytes()
        )
    survivors = party.server.survivors()
    assert len({id(m) for m in survivors.values()}) == 1
    for v, m in survivors.items():
        party.server.receive(party.clients[v].consistency(m.to_bytes()).to_bytes())
    assert set(party.server.unmask()) == set(sess.participants)


# --- leave-out logic --------------------------------------------------------------------------


def test_a_rogue_cannot_pick_the_encoding_by_sorting_first() -> None:
    """REFUSED (one colluding node named to sort first): it advertises another bound. The
    agreed encoding is the one t nodes share, whatever the order of the counts: the rogue
    is left out, never the honest four."""
    run = Run(("a0", "n1", "n2", "n3", "n4"), {**VALUES, "a0": VALUES["n0"]})
    results = run.sealed()
    ad = Message.from_bytes(results["a0"]["x"].data)
    forged = replace(ad, body={**ad.body, "bound": 2048.0}, signature=b"")
    results["a0"] = {"x": Sealed("masking", forged.signed(run.auths["a0"].identity.key).to_bytes())}
    out, summer = run.run(results)
    assert out.contributors["x"] == ["n1", "n2", "n3", "n4"]
    assert set(summer.refusals) == {"a0"}


def test_an_advert_under_another_sender_name_is_left_out_not_counted_for_it() -> None:
    """REFUSED (colluding node): it hands in an honest node's advertisement bytes as its own
    result. The encoding counts it (same shape), but `server.receive` pins the carrier:
    the rogue is left out, the honest node is not hurt, and the sum is of the others."""
    run = Run(MEMBERS, VALUES)
    results = run.sealed()
    results[ROGUE] = {"x": results["n2"]["x"]}
    out, summer = run.run(results)
    assert out.contributors["x"] == list(HONEST)
    assert np.array_equal(out.secure["x"], _exact(HONEST))
    assert set(summer.refusals) == {ROGUE}


def test_too_few_valid_advertisements_never_sum_fewer_than_t() -> None:
    """REFUSED: two rogues with unparsable advertisements leave three of t = 4: RunFailed,
    never a sum over three."""
    run = Run(MEMBERS, VALUES)
    results = run.sealed()
    for v in ("n1", "n3"):
        results[v] = {"x": Sealed("masking", _raw(b'{"body":{}}'))}
    with pytest.raises(RunFailed):
        run.run(results)


# --- wire encoder fast paths -------------------------------------------------------------------


def _round_trip(value: Any) -> Any:
    env = Envelope("ana", "a", "b", "result", 0, {"v": value}, None)
    return decode(encode(env)).body["v"]


class _Str(str):
    pass


class _Float(float):
    pass


class _Dict(dict):  # type: ignore[type-arg]
    def items(self) -> Any:  # what a Mapping walk of it sees
        return [("z", 1)]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"$sealed": 1, "scheme": "x"}, {"$sealed": 1, "scheme": "x"}),
        ({"$b": 0, "$nd": 1}, {"$b": 0, "$nd": 1}),
        ({_Str("$k"): _Str("v")}, {"$k": "v"}),
        ({"t": (1, (2, "x"))}, {"t": [1, [2, "x"]]}),
        ([True, 1, 1.0, None, -0.0], [True, 1, 1.0, None, -0.0]),
        (_Float(1.5), 1.5),
        (np.float64(2.5), 2.5),
        (np.bool_(True), True),
        (_Dict(a=5), {"z": 1}),
        ({1: "x", "a": 2}, {1: "x", "a": 2}),
    ],
)
def test_the_encoder_fast_paths_decode_as_before(value: Any, expected: Any) -> None:
    """REFUSED (a sender choosing types): exact and subclassed dicts and strs, '$' keys,
    tuples, bool vs int, numpy scalars decode to what the
    encoder gave before the fast paths (checked against af91482's encoder): a '$' key stays
    a key, never a blob reference, and True stays a bool."""
    got = _round_trip(value)
    assert got == expected and repr(got) == repr(expected)  # True stays True, not 1


def test_the_encoder_keeps_nan_and_infinity() -> None:
    got = _round_trip([float("nan"), float("inf"), -float("inf")])
    assert np.isnan(got[0]) and got[1:] == [float("inf"), -float("inf")]
    with pytest.raises(TypeError, match="key of type tuple"):
        _round_trip({("t",): 1})
    sealed = _round_trip(Sealed("masking", b"\x00ab"))
    assert sealed == Sealed("masking", b"\x00ab")

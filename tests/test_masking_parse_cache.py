"""Forwarded messages are parsed once per process (`messages._Parsed`): every node of an
in-process simulation opens the same relayed bytes. What one reader gets must not be
changeable under another, and every check of `open_message` still runs on each call."""

from __future__ import annotations

import copy

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flame.protocols.masking import Binding, Message, ProtocolViolation, messages
from flame.protocols.masking.messages import b64e, open_message

BINDING = Binding("ana", 3, "x", "run1")


def _advert(key: Ed25519PrivateKey, sender: str = "n1") -> bytes:
    body = {"shape": [2, 3], "c_pk": b64e(bytes(32)), "s_pk": b64e(bytes([1]) * 32)}
    return Message(BINDING, "advertise", sender, body).signed(key).to_bytes()


def test_every_reader_of_a_cached_message_gets_a_body_of_its_own() -> None:
    key = Ed25519PrivateKey.generate()
    data, keys = _advert(key), {"n1": key.public_key()}
    signed = copy.deepcopy(Message.from_bytes(data).body)
    for _ in range(3):  # the first read parses and keeps; the later ones are cache hits
        got = open_message(data, binding=BINDING, round="advertise", keys=keys, senders={"n1"})
        assert got.body == signed
        got.body["c_pk"] = "x"  # type: ignore[index]
        got.body.pop("s_pk")  # type: ignore[attr-defined]
        got.body["shape"].append(9)
        dict.__init__(got.body, shape=[7])  # type: ignore[arg-type]
    assert (data in messages._PARSED._seen) and messages._PARSED._seen[data][0].body == signed


def test_a_cached_parse_still_runs_every_check() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    data = _advert(key)
    keys = {"n1": key.public_key()}
    open_message(data, binding=BINDING, round="advertise", keys=keys, senders={"n1"})
    with pytest.raises(ProtocolViolation, match="another session"):
        open_message(data, binding=Binding("ana", 4, "x", "run1"), round="advertise", keys=keys)
    with pytest.raises(ProtocolViolation, match="where a 'consistency' message"):
        open_message(data, binding=BINDING, round="consistency", keys=keys)
    with pytest.raises(ProtocolViolation, match="who may not send it"):
        open_message(data, binding=BINDING, round="advertise", keys=keys, senders={"n2"})
    with pytest.raises(ProtocolViolation, match="arrived from 'n2'"):
        open_message(data, binding=BINDING, round="advertise", keys=keys, carrier="n2")
    with pytest.raises(ProtocolViolation, match="bad signature"):
        open_message(data, binding=BINDING, round="advertise", keys={"n1": other.public_key()})
    with pytest.raises(ProtocolViolation, match="no known identity"):
        open_message(data, binding=BINDING, round="advertise", keys={"n2": key.public_key()})


def test_a_bad_signature_is_refused_first_time_and_every_time() -> None:
    key, forger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    forged = _advert(forger)  # parsed and cached, never verified
    keys = {"n1": key.public_key()}
    for _ in range(2):
        with pytest.raises(ProtocolViolation, match="bad signature"):
            open_message(forged, binding=BINDING, round="advertise", keys=keys)


def test_a_point_to_point_message_is_not_shared_between_readers() -> None:
    msg = Message(BINDING, "survivors", "aggregator", {"u3": ["n1", "n2"]}).to_bytes()
    first = open_message(msg, binding=BINDING, round="survivors", keys=None)
    second = open_message(msg, binding=BINDING, round="survivors", keys=None)
    assert first is not second and first.body is not second.body


def test_only_a_message_that_passed_every_check_is_kept() -> None:
    key, forger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keys = {"n1": key.public_key()}
    forged, genuine = _advert(forger), _advert(key)
    with pytest.raises(ProtocolViolation, match="bad signature"):
        open_message(forged, binding=BINDING, round="advertise", keys=keys)
    with pytest.raises(ProtocolViolation, match="another session"):
        open_message(genuine, binding=Binding("ana", 9, "x"), round="advertise", keys=keys)
    assert forged not in messages._PARSED._seen and genuine not in messages._PARSED._seen
    open_message(genuine, binding=BINDING, round="advertise", keys=keys)
    assert genuine in messages._PARSED._seen

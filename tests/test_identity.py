"""Identities, roster and signed messages: forged, foreign and relabelled messages never act."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flame
from flame.data import Data
from flame.errors import ConfigError, MessageError
from flame.identity import (
    Authenticator,
    Identity,
    Member,
    Roster,
    SignatureError,
    status_signed_by,
    verify_envelope,
    write_identity,
)
from flame.identity.signing import sign_parts
from flame.transport.memory import MemoryBroker, MemoryTransport
from flame.wire.envelope import Envelope, encode, encode_parts

NODES = ["alpha", "beta", "gamma"]
VALUES = {"alpha": [1.0, 2.0], "beta": [10.0], "gamma": [100.0, 200.0, 300.0]}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("FLAME_"):
            monkeypatch.delenv(name)


def make_roster(extra: dict[str, str] | None = None) -> tuple[Roster, dict[str, Identity]]:
    roles = {"aggregator": "aggregation", **{n: "analysis" for n in NODES}, **(extra or {})}
    identities = {node: Identity.generate(node) for node in roles}
    roster = Roster([Member(n, roles[n], identities[n].public_text) for n in roles])
    return roster, identities


def signed(identity: Identity, envelope: Envelope) -> bytes:
    return b"".join(bytes(part) for part in sign_parts(identity, encode_parts(envelope)))


# --- files ----------------------------------------------------------------------------------


def test_identity_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    identity = Identity.generate("clinic-a")
    private, public = write_identity(identity, tmp_path)
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.read_text().strip() == identity.public_text
    assert Identity.load("clinic-a", private).public_text == identity.public_text
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_identity(Identity.generate("clinic-a"), tmp_path)
    private.chmod(0o640)
    with pytest.raises(ConfigError, match=r"accessible by group/others \(mode 0640\).*chmod 600"):
        Identity.load("clinic-a", private)
    assert "PRIVATE" not in repr(identity)


def test_roster_round_trip_and_fingerprint(tmp_path: Path) -> None:
    roster, identities = make_roster()
    path = tmp_path / "roster.toml"
    roster.save(path)
    again = Roster.load(path)
    assert [m.node_id for m in again] == ["aggregator", "alpha", "beta", "gamma"]
    assert again.fingerprint == roster.fingerprint
    assert again.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    assert again.require("alpha", "analysis", "x").public_text == identities["alpha"].public_text
    with pytest.raises(ConfigError, match="'zeta' is not in the roster"):
        again.require("zeta", "analysis", "FLAME_PARTICIPANTS")
    with pytest.raises(ConfigError, match="has role 'analysis'"):
        again.require("alpha", "aggregation", "FLAME_AGGREGATOR_ID")
    with pytest.raises(ConfigError, match="listed twice"):
        roster.with_member(Member("alpha", "analysis", Identity.generate("x").public_text))
    with pytest.raises(ConfigError, match="share one public key"):
        roster.with_member(Member("delta", "analysis", identities["alpha"].public_text))
    with pytest.raises(ConfigError, match="member #1: 'public_key' is required"):
        Roster.loads('[[member]]\nid = "a"\nrole = "analysis"\n')
    with pytest.raises(ConfigError, match="ed25519:"):
        Roster.loads('[[member]]\nid = "a"\nrole = "analysis"\npublic_key = "rsa:xx"\n')


# --- signatures -----------------------------------------------------------------------------


def test_signed_envelope_verifies_and_any_change_is_caught() -> None:
    roster, ids = make_roster(extra={"mallory": "analysis"})
    envelope = Envelope("study", "alpha", "aggregator", "result", 3, {"x": np.arange(5.0)})
    blob = signed(ids["alpha"], envelope)
    back = verify_envelope(blob, roster, sender="alpha", kind="result")
    np.testing.assert_array_equal(back.body["x"], np.arange(5.0))
    assert back.signed == blob
    # one flipped byte anywhere in the frame (here: the array's last byte)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(SignatureError, match="bad signature"):
        verify_envelope(bytes(tampered), roster)
    # a frame signed by someone not in the roster
    stranger = Identity.generate("alpha")
    with pytest.raises(SignatureError, match="bad signature"):
        verify_envelope(signed(stranger, envelope), roster)
    with pytest.raises(SignatureError, match="foreign"):
        verify_envelope(signed(Identity.generate("eve"), envelope), roster)
    # Sybil: mallory (a real member) signs a result that claims to be alpha's
    with pytest.raises(SignatureError, match="from 'alpha' but is signed by 'mallory'"):
        verify_envelope(signed(ids["mallory"], envelope), roster)
    # a kick-off or abort signed by an analysis node: only the aggregator may send those
    abort = Envelope("study", "alpha", "beta", "abort", 0, {"reason": "x"})
    with pytest.raises(SignatureError, match="role 'analysis'"):
        verify_envelope(signed(ids["alpha"], abort), roster)
    result = Envelope("study", "aggregator", "alpha", "result", 0, 1.0)
    with pytest.raises(SignatureError, match="role 'aggregation'"):
        verify_envelope(signed(ids["aggregator"], result), roster)
    with pytest.raises(SignatureError, match="unsigned"):
        verify_envelope(encode(envelope), roster)
    with pytest.raises(MessageError):
        verify_envelope(b"garbage", roster)
    with pytest.raises(SignatureError, match="expected 'beta'"):
        verify_envelope(blob, roster, sender="beta")


def test_forwarded_result_is_checked_by_a_third_party() -> None:
    """What the aggregator keeps (`envelope.signed`) proves the contribution to a decrypter."""
    roster, ids = make_roster()
    broker = MemoryBroker()
    auth = {n: Authenticator(ids[n], roster) for n in ids}
    node = MemoryTransport(broker, "study", "alpha", auth=auth["alpha"])
    aggregator = MemoryTransport(broker, "study", "aggregator", auth=auth["aggregator"])
    node.connect({"state": "waiting"})
    aggregator.connect({"state": "waiting"})
    node.send(Envelope("study", "alpha", "aggregator", "result", 0, {"c": b"ciphertext"}))
    received = aggregator.receive(5.0)
    assert received is not None and received.signed is not None
    # the aggregator forwards the exact signed bytes inside its own (signed) message
    aggregator.send(
        Envelope("study", "aggregator", "beta", "message", 0, {"from": bytes(received.signed)})
    )
    beta = MemoryTransport(broker, "study", "beta", auth=auth["beta"])
    beta.connect({"state": "waiting"})
    forwarded = beta.receive(5.0)
    assert forwarded is not None and forwarded.sender == "aggregator"
    inner = verify_envelope(forwarded.body["from"], roster, sender="alpha", kind="result")
    assert inner.body == {"c": b"ciphertext"}
    # had the aggregator changed the contribution, the decrypter would see it
    changed = bytearray(forwarded.body["from"])
    changed[-3] ^= 0xFF
    with pytest.raises(SignatureError):
        verify_envelope(bytes(changed), roster, sender="alpha")


def test_statuses_are_signed_and_checked() -> None:
    roster, ids = make_roster()
    broker = MemoryBroker()
    alpha = MemoryTransport(broker, "s", "alpha", auth=Authenticator(ids["alpha"], roster))
    watcher = MemoryTransport(
        broker, "s", "aggregator", auth=Authenticator(ids["aggregator"], roster)
    )
    watcher.connect({"state": "waiting"})
    watcher.watch(["alpha", "beta"])
    alpha.connect({"state": "waiting", "session": "s1"})
    stored = broker.statuses("s")["alpha"]
    assert status_signed_by(roster, "s", "alpha", stored)
    assert not status_signed_by(roster, "other-analysis", "alpha", stored)
    assert not status_signed_by(roster, "s", "beta", stored)
    got = watcher.receive(2.0)
    assert got is not None and got.body["state"] == "waiting"
    assert got.body["instance"] == alpha.instance and "sig" not in got.body
    # a forged status "from beta" (unsigned, or signed by alpha) is dropped and counted
    broker.set_status("s", "beta", {"state": "offline"})
    broker.set_status("s", "beta", {**stored, "state": "failed"})
    assert watcher.receive(0.3) is None
    assert watcher.rejected == 2


# --- runs -----------------------------------------------------------------------------------


def analyze(data: Data) -> dict[str, Any]:
    x = data.read_csv()["x"]
    return {"sum": float(x.sum()), "n": int(x.size)}


def aggregate(results: dict[str, Any]) -> dict[str, Any]:
    return {"sum": sum(r["sum"] for r in results.values()), "nodes": sorted(results)}


def data() -> dict[str, dict[str, str]]:
    return {n: {"x.csv": "x\n" + "".join(f"{v}\n" for v in vs)} for n, vs in VALUES.items()}


def test_forged_and_relabelled_messages_never_reach_aggregate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Sybil results, a forged abort 'from the aggregator', unsigned results: all dropped."""
    roster, ids = make_roster(extra={"mallory": "analysis"})
    auths = {n: Authenticator(ids[n], roster) for n in ids}
    broker = MemoryBroker()
    analysis = "forged"
    seen: list[dict[str, Any]] = []
    injected = []

    def hook(envelope: Envelope) -> bool:
        if envelope.kind == "start" and not injected:
            for node in NODES:  # before any real result: a Sybil result for every node
                fake = Envelope(analysis, node, "aggregator", "result", 0, {"sum": 1e9, "n": 1})
                broker.inject(analysis, "aggregator", signed(ids["mallory"], fake))
                broker.inject(analysis, "aggregator", encode(fake))
            abort = Envelope(analysis, "aggregator", "beta", "abort", 0, {"reason": "forged"})
            broker.inject(analysis, "beta", signed(ids["mallory"], abort))
            broker.inject(analysis, "beta", encode(abort))
            injected.append(True)
        return True

    broker.on_send = hook

    def recording(results: dict[str, Any]) -> dict[str, Any]:
        seen.append(dict(results))
        return aggregate(results)

    def factory(node: str) -> MemoryTransport:
        return MemoryTransport(broker, analysis, node, auth=auths[node])

    with caplog.at_level(logging.WARNING):
        result = flame.simulate(
            analyze,
            recording,
            data=data(),
            config=flame.config.load_config(
                analysis_id=analysis, epoch_timeout=10, presence_timeout=10
            ),
            broker=factory,
        )
    assert result.value == {"sum": 613.0, "nodes": NODES}
    assert all(r["sum"] < 1e9 for call in seen for r in call.values())
    text = caplog.text
    for node in NODES:
        assert f"claiming to be from '{node}': says it is from '{node}' but is signed by" in text
        assert f"claiming to be from '{node}': unsigned message" in text
    assert "claiming to be from 'aggregator'" in text
    assert auths["aggregator"].rejected == 6 and auths["beta"].rejected == 2


def test_simulate_always_signs() -> None:
    broker = MemoryBroker()
    broker.record = True
    result = flame.simulate(analyze, aggregate, data=data(), broker=broker)
    assert result.value["sum"] == 613.0
    assert broker.delivered
    statuses = broker.statuses("local")
    assert all("sig" in s and "instance" in s for s in statuses.values())


# --- flame run needs a roster ---------------------------------------------------------------


def _flame(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flame", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_flame_run_requires_a_roster_or_a_loud_opt_out(tmp_path: Path) -> None:
    code = "def analyze(d):\n    return 1\n\ndef aggregate(r):\n    return 1\n"
    (tmp_path / "a.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAME_")}
    env.update(
        FLAME_NODE_ID="aggregator",
        FLAME_ROLE="aggregation",
        FLAME_PARTICIPANTS="a,b",
        FLAME_BROKER__URL="mqtt://127.0.0.1:9",
        FLAME_BROKER__CONNECT_TIMEOUT="1",
    )
    done = _flame("run", str(tmp_path / "a.py"), env=env)
    assert done.returncode == 2, done.stderr
    assert "FLAME_ROSTER / roster: required" in done.stderr
    assert "FLAME_IDENTITY__KEY_FILE" in done.stderr and "FLAME_ALLOW_UNSIGNED" in done.stderr
    done = _flame("run", str(tmp_path / "a.py"), env={**env, "FLAME_ALLOW_UNSIGNED": "true"})
    assert "UNSIGNED RUN" in done.stderr  # then it fails later, at the (absent) broker
    assert "FLAME_ROSTER / roster: required" not in done.stderr


def test_roster_cli_and_identity_cli(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAME_")}
    roster = tmp_path / "roster.toml"
    for node, role in (("aggregator", "aggregation"), ("clinic-a", "analysis")):
        done = _flame("keys", "identity", node, "--out", str(tmp_path / "keys"), env=env)
        assert done.returncode == 0, done.stderr
        pub = tmp_path / "keys" / f"{node}.pub"
        done = _flame("roster", "add", str(roster), node, "--role", role, "--public-key",
                      str(pub), env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
    again = _flame("keys", "identity", "clinic-a", "--out", str(tmp_path / "keys"), env=env)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    shown = _flame("roster", "show", str(roster), env=env)
    fingerprint = hashlib.sha256(roster.read_bytes()).hexdigest()
    assert f"fingerprint (SHA-256): {fingerprint}" in shown.stdout
    assert "clinic-a" in shown.stdout and "aggregation" in shown.stdout
    assert Roster.load(roster).get("clinic-a") is not None


def test_key_hygiene(tmp_path: Path) -> None:
    """Loose key files are refused (not warned about); a JWT without any signature check is
    'not signature-checked', never 'valid'; a JWKS URL must be https."""
    import base64
    import json
    import time

    from flame.clients.token import TokenError, check_token
    from flame.config import load_config
    from flame.main import secure_keys

    share = tmp_path / "share-a.json"
    share.write_text("{}")
    share.chmod(0o644)
    config = load_config(secure={"enabled": True, "key_share_file": str(share)})
    with pytest.raises(ConfigError, match=r"KEY_SHARE_FILE.*mode 0644.*chmod 600"):
        secure_keys(config, "analysis")
    private = tmp_path / "private_key.json"
    private.write_text("{}")
    private.chmod(0o604)
    config = load_config(secure={"enabled": True, "private_key_file": str(private)})
    with pytest.raises(ConfigError, match=r"PRIVATE_KEY_FILE.*accessible by group/others"):
        secure_keys(config, "analysis")

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    token = f"{part({'alg': 'RS256'})}.{part({'exp': int(time.time()) + 600})}.c2ln"
    info = str(check_token(token, service="data API 'x'"))
    assert "not signature-checked" in info and "valid" not in info
    with pytest.raises(TokenError, match=r"JWKS URL http://keys\.example/jwks must be https"):
        check_token(token, service="data API 'x'", jwks_url="http://keys.example/jwks")


def test_instances_tell_a_restart_from_two_live_processes() -> None:
    from flame.aggregator.membership import Instances, code_problem

    restart = Instances()
    for body in ({"instance": "a"}, {"instance": "a", "state": "sent"}, {"instance": "b"},
                 {"instance": "a", "state": "offline"},  # a's will, after b's first status
                 {"instance": "b", "state": "computing"}):  # fmt: skip
        assert restart.note("site_b", body) is None
    assert restart.current("site_b") == "b"
    twins = Instances()
    assert twins.note("site_b", {"instance": "a"}) is None
    assert twins.note("site_b", {"instance": "b"}) is None
    assert twins.note("site_b", {"instance": "a"}) == (
        "two processes claim node 'site_b' (instances b, a)"
    )
    told = Instances()
    told.note("site_b", {"instance": "b"})
    assert told.note("site_b", {"state": "failed", "conflict": "a", "instance": "a"}) == (
        "two processes claim node 'site_b' (instances a, b)"
    )
    assert code_problem("n", {"state": "sent", "code": "x" * 64}, "x" * 64) is None
    mixed = code_problem("n", {"state": "sent", "code": "y" * 64}, "x" * 64)
    assert mixed is not None and "node 'n' runs different analysis code" in mixed
    assert code_problem("n", {"state": "offline"}, "x" * 64) is None

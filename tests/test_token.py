"""Token reading and checking with JWTs signed here by a generated RSA key."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from servers.fhir_server import DataApiServer

from flame.clients.token import (
    RedactingFilter,
    TokenError,
    TokenSource,
    check_service_tokens,
    check_settings_token,
    check_token,
    looks_like_jwt,
    read_token,
    redact,
    service_tokens,
)
from flame.config import (
    BrokerSettings,
    DataSourceSettings,
    FlameConfig,
    StorageSettings,
    TokenSettings,
)

pytest_plugins = ["servers.plugin"]

ISSUER = "https://auth.example.org/realms/flame"
AUDIENCE = "flame-node"
SERVICE = "data API 'fhir'"


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def key_file(tmp_path: Path, signing_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "issuer.pem"
    path.write_bytes(
        signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.fixture
def jwks_url(data_api: DataApiServer, signing_key: rsa.RSAPrivateKey) -> str:
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(signing_key.public_key(), as_dict=True)
    data_api.jwks = {"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}
    return data_api.jwks_url


Make = Callable[..., str]


@pytest.fixture
def make(signing_key: rsa.RSAPrivateKey) -> Make:
    def build(key: Any = None, alg: str = "RS256", kid: str = "k1", **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "node-7-service-account",
            "iat": now,
            "exp": now + 3600,
        }
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key or signing_key, algorithm=alg, headers={"kid": kid})

    return build


def assert_safe(message: str, token: str) -> None:
    """One line, and no piece of the token in it."""
    assert "\n" not in message
    assert token not in message
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in message
            assert part[:12] not in message


# --------------------------------------------------------------------------- check_token

CASES: list[tuple[str, dict[str, Any], str | None]] = [
    ("valid", {}, None),
    ("expired", {"exp": int(time.time()) - 3600}, "token expired at "),
    ("not yet valid", {"nbf": int(time.time()) + 3600}, "token not valid before "),
    ("wrong audience", {"aud": "someone-else"}, "token audience does not include 'flame-node'"),
    ("wrong issuer", {"iss": "https://evil.example"}, f"token issuer is not {ISSUER!r}"),
    ("audience list", {"aud": ["x", AUDIENCE]}, None),
    ("no expiry", {"exp": None}, None),
    ("bad exp type", {"exp": "tomorrow"}, "token has an invalid 'exp' claim"),
]


@pytest.mark.parametrize("verifier", ["key_file", "jwks"])
@pytest.mark.parametrize(("case", "claims", "expected"), CASES, ids=[c[0] for c in CASES])
def test_check_token_claims(
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    make: Make,
    verifier: str,
    case: str,
    claims: dict[str, Any],
    expected: str | None,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = make(**claims)
    keys: dict[str, Any] = (
        {"key_file": request.getfixturevalue("key_file")}
        if verifier == "key_file"
        else {"jwks_url": request.getfixturevalue("jwks_url")}
    )
    if expected is None:
        info = check_token(token, service=SERVICE, issuer=ISSUER, audience=AUDIENCE, **keys)
        assert info.kind == "jwt" and info.signature_checked
        assert (info.expires_at is None) == (case == "no expiry")
        assert_safe(str(info), token)
    else:
        with pytest.raises(TokenError) as caught:
            check_token(token, service=SERVICE, issuer=ISSUER, audience=AUDIENCE, **keys)
        message = str(caught.value)
        assert message.startswith(f"{SERVICE}: {expected}")
        assert caught.value.service == SERVICE
        assert_safe(message, token)
    assert token not in caplog.text


def test_expired_message_names_the_time(make: Make) -> None:
    token = make(exp=1_795_168_800)  # 2026-11-20T10:00:00Z
    with pytest.raises(
        TokenError, match=r"^data API 'fhir': token expired at 2026-11-20T10:00:00Z$"
    ):
        check_token(token, service=SERVICE, now=1_795_200_000)


@pytest.mark.parametrize("verifier", ["key_file", "jwks"])
def test_wrong_signature(
    request: pytest.FixtureRequest, make: Make, other_key: Any, verifier: str
) -> None:
    token = make(key=other_key)
    keys: dict[str, Any] = (
        {"key_file": request.getfixturevalue("key_file")}
        if verifier == "key_file"
        else {"jwks_url": request.getfixturevalue("jwks_url")}
    )
    with pytest.raises(TokenError) as caught:
        check_token(token, service="storage", **keys)
    assert str(caught.value) == "storage: token signature invalid"
    assert_safe(str(caught.value), token)


def test_tampered_claims_fail_the_signature(make: Make, key_file: Path) -> None:
    token = make()
    header, _, signature = token.split(".")
    forged_claims = jwt.utils.base64url_encode(b'{"exp": 9999999999, "aud": "flame-node"}')
    forged = f"{header}.{forged_claims.decode()}.{signature}"
    with pytest.raises(TokenError, match="signature invalid"):
        check_token(forged, service="broker", key_file=key_file)


def test_algorithm_confusion_and_none_are_refused(make: Make, key_file: Path) -> None:
    pem = key_file.read_bytes()
    # An HS256 token "signed" with the public key as the HMAC secret must not verify.
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}').decode()
    claims = jwt.utils.base64url_encode(b'{"exp": 9999999999}').decode()
    import hashlib
    import hmac

    mac = hmac.new(pem, f"{header}.{claims}".encode(), hashlib.sha256).digest()
    confused = f"{header}.{claims}.{jwt.utils.base64url_encode(mac).decode()}"
    with pytest.raises(TokenError, match="token algorithm is not one of"):
        check_token(confused, service="broker", key_file=key_file)
    none_header = jwt.utils.base64url_encode(b'{"alg":"none"}').decode()
    with pytest.raises(TokenError, match="token algorithm is not one of"):
        check_token(f"{none_header}.{claims}.", service="broker", key_file=key_file)


@pytest.mark.parametrize(
    ("token", "checks", "expected"),
    [
        ("abc.def.ghi", {}, "token is malformed"),
        ("not a jwt at all", {"audience": AUDIENCE}, "token is not a JWT"),
        ("s3cr3t-broker-password", {"key_file": "unused.pem"}, "token is not a JWT"),
        ("   ", {}, "token is empty"),
        ("eyJhbGciOiJSUzI1NiJ9.WzEsMl0.c2ln", {}, "token is malformed (JWT header or claims"),
    ],
)
def test_garbage_tokens(token: str, checks: dict[str, Any], expected: str) -> None:
    with pytest.raises(TokenError) as caught:
        check_token(token, service="broker", **checks)
    assert str(caught.value).startswith(f"broker: {expected}")
    if token.strip():
        assert_safe(str(caught.value), token)


def test_opaque_token_without_checks_is_accepted() -> None:
    info = check_token("plain-broker-password", service="broker")
    assert info.kind == "opaque"
    assert "plain-broker-password" not in str(info)


def test_jwt_shape_is_always_checked_for_expiry(make: Make) -> None:
    token = make(exp=int(time.time()) - 120)
    with pytest.raises(TokenError, match=r"^broker: token expired at "):
        check_token(token, service="broker")  # no issuer, audience or key configured


def test_leeway_and_verify_off(make: Make) -> None:
    token = make(exp=int(time.time()) - 10)
    assert check_token(token, service="broker", leeway=30).kind == "jwt"
    with pytest.raises(TokenError):
        check_token(token, service="broker", leeway=0)
    assert check_token(token, service="broker", verify=False).kind == "jwt"
    assert check_token(None, service="broker").kind == "none"


def test_jwks_problems(data_api: DataApiServer, make: Make, jwks_url: str) -> None:
    with pytest.raises(TokenError, match=r"token key id is not in the JWKS at http://127\.0\.0\.1"):
        check_token(make(kid="rotated-away"), service="storage", jwks_url=jwks_url)
    # unreachable JWKS endpoint: a closed port
    from servers.s3_server import free_port

    url = f"http://127.0.0.1:{free_port()}/jwks.json?secret=x"
    with pytest.raises(TokenError, match=r"cannot fetch JWKS from http://127\.0\.0\.1:") as caught:
        check_token(make(), service="storage", jwks_url=url)
    assert "secret=x" not in str(caught.value)
    # a slow JWKS endpoint is cut off by the timeout
    data_api.add_fault("/.well-known/jwks-slow", None, delay=3.0)
    started = time.monotonic()
    with pytest.raises(TokenError, match=r"timed out after 0\.3 s"):
        check_token(
            make(), service="storage", jwks_url=f"{data_api.url}/.well-known/jwks-slow", timeout=0.3
        )
    assert time.monotonic() - started < 2.5


# --------------------------------------------------------------------------- reading


def test_token_source_inline_and_file_rotation(tmp_path: Path, make: Make) -> None:
    assert read_token(TokenSettings(token="inline-token"), "broker") == "inline-token"
    assert read_token(TokenSettings(), "broker") is None
    path = tmp_path / "token"
    first, second = make(sub="a"), make(sub="bb")
    path.write_text(first + "\n")
    source = TokenSource(TokenSettings(token_file=path), "broker")
    assert source.get() == first
    assert source.get() == first
    # Kubernetes swaps the file atomically; a new inode/size/mtime means re-read.
    replacement = tmp_path / "token.new"
    replacement.write_text(second)
    os.replace(replacement, path)
    assert source.get() == second


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("missing", "broker: token file {path} not found"),
        ("empty", "broker: token file {path} is empty"),
        ("directory", "broker: token file {path} is not a regular file"),
    ],
)
def test_token_file_problems(tmp_path: Path, setup: str, expected: str) -> None:
    path = tmp_path / "x"
    if setup == "empty":
        path.write_text("  \n")
    elif setup == "directory":
        path.mkdir()
    with pytest.raises(TokenError) as caught:
        read_token(TokenSettings(token_file=path), "broker")
    assert str(caught.value) == expected.format(path=path)


def test_check_settings_token_with_file(tmp_path: Path, make: Make, key_file: Path) -> None:
    path = tmp_path / "token"
    path.write_text(make())
    settings = TokenSettings(
        token_file=path, issuer=ISSUER, audience=AUDIENCE, verify_key_file=key_file
    )
    info = check_settings_token(settings, "storage")
    assert info.signature_checked and info.expires_at is not None


# --------------------------------------------------------------------------- start-up


def test_check_service_tokens(tmp_path: Path, make: Make, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good, expired = make(), make(exp=int(time.time()) - 7200)
    token_file = tmp_path / "fhir-token"
    token_file.write_text(good)
    config = FlameConfig(
        analysis_id="a1",
        broker=BrokerSettings(url="mqtt://broker:1883", token="broker-password"),
        data=[
            DataSourceSettings(name="local", kind="local", path=tmp_path),
            DataSourceSettings(
                name="fhir",
                kind="fhir",
                url="http://fhir/",
                token_file=token_file,
                audience=AUDIENCE,
            ),
        ],
        storage=StorageSettings(endpoint="minio:9000", token=good),
    )
    assert [s for s, _ in service_tokens(config)] == ["broker", "data API 'fhir'", "storage"]
    infos = check_service_tokens(config)
    assert [i.kind for i in infos] == ["opaque", "jwt", "jwt"]
    lines = [str(i) for i in infos]
    assert lines[1].startswith("data API 'fhir': JWT not signature-checked (no jwks_url")
    for line in lines:
        assert good not in line and "broker-password" not in line

    bad = config.model_copy(
        update={"storage": StorageSettings(endpoint="minio:9000", token=expired)}
    )
    with pytest.raises(TokenError) as caught:
        check_service_tokens(bad)
    assert str(caught.value).startswith("storage: token expired at ")
    assert_safe(str(caught.value), expired)

    missing = config.model_copy(
        update={"broker": BrokerSettings(url="mqtt://b", token_file=tmp_path / "nope")}
    )
    with pytest.raises(TokenError, match=r"^broker: token file .*nope not found$"):
        check_service_tokens(missing)
    assert good not in caplog.text and expired not in caplog.text

    # Nothing configured that needs a token: nothing to check.
    assert check_service_tokens(FlameConfig(analysis_id="a1")) == []


def test_redact_and_filter(caplog: pytest.LogCaptureFixture) -> None:
    secret = "eyJhbGciOi.secret-payload.sig"
    assert redact(f"Bearer {secret} and again {secret}", [secret, ""]) == "Bearer *** and again ***"
    assert looks_like_jwt(secret) and not looks_like_jwt("plain password")
    logger = logging.getLogger("flame.test.redact")
    redactor = RedactingFilter([secret])
    logger.addFilter(redactor)
    try:
        with caplog.at_level(logging.INFO, logger="flame.test.redact"):
            logger.info("oops, logged %s", secret)
    finally:
        logger.removeFilter(redactor)
    assert secret not in caplog.text and "oops, logged ***" in caplog.text

"""Read and check the tokens a node presents to its services (broker, data APIs, storage).

A node checks every token before it does any work, so a bad secret stops it at once with one
line naming the service and the reason instead of failing half-way through an epoch. Messages
never contain the token or any slice of it: they are written to logs and shown to operators.
Claims the operator needs to act on (the expiry time) are named; claims that identify the
token (subject, id) are not.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from flame.config import TokenSettings
from flame.errors import FlameError
from flame.utils.redact import redact as _redact

if TYPE_CHECKING:
    from flame.config import FlameConfig

__all__ = [
    "DEFAULT_LEEWAY",
    "RedactingFilter",
    "TokenError",
    "TokenInfo",
    "TokenSource",
    "check_service_tokens",
    "check_settings_token",
    "check_token",
    "looks_like_jwt",
    "read_token",
    "redact",
    "service_tokens",
    "source_service_name",
]

log = logging.getLogger(__name__)

DEFAULT_LEEWAY = 30.0
"""Seconds of clock skew tolerated on exp / nbf: node clocks are NTP-synced, not identical."""

JWKS_TIMEOUT = 10.0
JWKS_LIFESPAN = 300.0

_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_RSA_ALGS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
_ASYMMETRIC_ALGS = [*_RSA_ALGS, "ES256", "ES384", "ES512", "EdDSA"]


class TokenError(FlameError):
    """A token is missing, malformed, expired or rejected; the message is one safe line."""

    def __init__(self, service: str, reason: str) -> None:
        super().__init__(f"{service}: {reason}")
        self.service = service
        self.reason = reason


@dataclass(frozen=True)
class TokenInfo:
    """What a check found out about a token, without the token itself."""

    service: str
    kind: Literal["none", "opaque", "jwt"]
    expires_at: datetime | None = None
    signature_checked: bool = False

    def __str__(self) -> str:
        if self.kind == "none":
            return f"{self.service}: no token configured"
        if self.kind == "opaque":
            return f"{self.service}: opaque token (not a JWT; nothing to check)"
        expiry = f"expires {_iso(self.expires_at)}" if self.expires_at else "no expiry"
        if self.signature_checked:
            return f"{self.service}: JWT valid, {expiry}, signature verified"
        # Without a JWKS URL or key file nobody checked who issued it: never say "valid".
        return (
            f"{self.service}: JWT not signature-checked (no jwks_url or verify_key_file "
            f"configured), {expiry}"
        )


def _iso(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- reading


class TokenSource:
    """A service's current token, re-read from its file whenever the file changes.

    Kubernetes rotates a mounted secret by swapping a symlink, so the file's identity
    (inode, size, mtime) changes; comparing that on every `get()` costs one `stat` and means
    a long run picks up a rotated token without a restart. An inline token (from the
    environment) wins over the file because it is the explicit, per-process override.
    """

    def __init__(self, settings: TokenSettings, service: str) -> None:
        self.service = service
        self._inline = settings.token.get_secret_value() if settings.token is not None else None
        self._path = settings.token_file
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._cached: str | None = None

    @property
    def configured(self) -> bool:
        return bool(self._inline) or self._path is not None

    @property
    def path(self) -> Path | None:
        return self._path

    def get(self) -> str | None:
        """The token to send now, or None when the service needs none."""
        if self._inline:
            return self._inline
        if self._path is None:
            return None
        path = self._path
        try:
            info = path.stat()
        except FileNotFoundError:
            raise TokenError(self.service, f"token file {path} not found") from None
        except OSError as exc:
            raise TokenError(self.service, f"token file {path}: {exc.strerror}") from None
        stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
        with self._lock:
            if stamp == self._stamp and self._cached is not None:
                return self._cached
            if not path.is_file():
                raise TokenError(self.service, f"token file {path} is not a regular file")
            try:
                text = path.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise TokenError(self.service, f"token file {path} is not UTF-8 text") from None
            except OSError as exc:
                raise TokenError(self.service, f"token file {path}: {exc.strerror}") from None
            if not text:
                raise TokenError(self.service, f"token file {path} is empty")
            if self._stamp is not None:
                log.info("%s: token file %s changed; using the new token", self.service, path)
            self._stamp, self._cached = stamp, text
            return text


def read_token(settings: TokenSettings, service: str) -> str | None:
    """The token configured for `service` (inline or from its file); None when none is set."""
    return TokenSource(settings, service).get()


# --------------------------------------------------------------------------- checking


def looks_like_jwt(token: str) -> bool:
    """Three base64url parts: such a token is always checked, whatever else is configured."""
    return bool(_JWT_SHAPE.match(token.strip()))


def _b64json(part: str) -> Any:
    padded = part + "=" * (-len(part) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))


class _JwksCache:
    """JWKS documents by URL, refreshed after a lifespan or when a key id is unknown."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sets: dict[str, tuple[float, jwt.PyJWKSet]] = {}

    def get_key(self, url: str, kid: str | None, service: str, timeout: float) -> jwt.PyJWK:
        for refresh in (False, True):
            keys = self._keyset(url, service, timeout, refresh=refresh)
            candidates = [k for k in keys.keys if kid is None or k.key_id == kid]
            if kid is None and len(candidates) > 1:
                candidates = [k for k in candidates if k.public_key_use in (None, "sig")]
            if candidates:
                return candidates[0]
        raise TokenError(service, f"token key id is not in the JWKS at {_url_no_query(url)}")

    def _keyset(self, url: str, service: str, timeout: float, *, refresh: bool) -> jwt.PyJWKSet:
        now = time.monotonic()
        with self._lock:
            cached = self._sets.get(url)
            if cached is not None and not refresh and now - cached[0] < JWKS_LIFESPAN:
                return cached[1]
        where = _url_no_query(url)
        try:
            response = httpx.get(url, timeout=timeout, follow_redirects=True)
            response.raise_for_status()
            keyset = jwt.PyJWKSet.from_dict(response.json())
        except httpx.HTTPStatusError as exc:
            raise TokenError(
                service, f"cannot fetch JWKS from {where}: HTTP {exc.response.status_code}"
            ) from None
        except httpx.TimeoutException:
            raise TokenError(
                service, f"cannot fetch JWKS from {where}: timed out after {timeout:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise TokenError(service, f"cannot fetch JWKS from {where}: {exc}") from None
        except (ValueError, jwt.PyJWKSetError, jwt.PyJWKError):
            raise TokenError(service, f"JWKS at {where} is not a valid key set") from None
        with self._lock:
            self._sets[url] = (now, keyset)
        return keyset


_JWKS = _JwksCache()


def _require_https(url: str, service: str) -> None:
    """A JWKS fetched over plain HTTP could be swapped in transit, and with it every token
    check: refuse it, except on this machine (loopback), where there is no transit."""
    parsed = httpx.URL(url)
    host = parsed.host
    if parsed.scheme == "https" or host in ("localhost", "127.0.0.1", "::1"):
        return
    raise TokenError(service, f"JWKS URL {_url_no_query(url)} must be https")


def _url_no_query(url: str) -> str:
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}{parsed.path}"


def _load_key_file(path: Path, service: str) -> tuple[Any, list[str]]:
    """A PEM public key or certificate and the algorithms that key may verify.

    Tying the algorithms to the key type blocks algorithm confusion (an HS256 token "signed"
    with the public key as an HMAC secret).
    """
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise TokenError(service, f"verify key file {path} not found") from None
    except OSError as exc:
        raise TokenError(service, f"verify key file {path}: {exc.strerror}") from None
    try:
        if b"BEGIN CERTIFICATE" in pem:
            key: Any = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = load_pem_public_key(pem)
    except ValueError:
        raise TokenError(service, f"verify key file {path} is not a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, _RSA_ALGS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key, ["ES256", "ES384", "ES512"]
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return key, ["EdDSA"]
    raise TokenError(service, f"verify key file {path} holds an unsupported key type")


def _claim_time(claims: Mapping[str, Any], name: str, service: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError(service, f"token has an invalid '{name}' claim")
    return float(value)


def check_token(
    token: str | None,
    *,
    service: str,
    issuer: str | None = None,
    audience: str | None = None,
    jwks_url: str | None = None,
    key_file: Path | str | None = None,
    verify: bool = True,
    leeway: float = DEFAULT_LEEWAY,
    timeout: float = JWKS_TIMEOUT,
    now: float | None = None,
) -> TokenInfo:
    """Check a token the way the service would, before the node relies on it.

    Opaque tokens (brokers often take plain passwords) pass when nothing but expiry would be
    checked; anything shaped like a JWT is decoded and its expiry always checked. Raises
    `TokenError` with one line naming `service` and the reason.
    """
    if token is None:
        return TokenInfo(service, "none")
    token = token.strip()
    if not token:
        raise TokenError(service, "token is empty")
    if not verify:
        return TokenInfo(service, "jwt" if looks_like_jwt(token) else "opaque")
    wants_claims = any(v is not None for v in (issuer, audience, jwks_url, key_file))
    if not looks_like_jwt(token):
        if wants_claims:
            raise TokenError(
                service, "token is not a JWT, but issuer/audience/signature checks are configured"
            )
        return TokenInfo(service, "opaque")

    header_part, claims_part, _ = token.split(".")
    try:
        header = _b64json(header_part)
        claims = _b64json(claims_part)
    except (ValueError, UnicodeDecodeError):
        raise TokenError(service, "token is malformed (not a decodable JWT)") from None
    if not isinstance(header, dict) or not isinstance(claims, dict) or "alg" not in header:
        raise TokenError(service, "token is malformed (JWT header or claims are not objects)")

    signature_checked = False
    if jwks_url is not None:
        _require_https(jwks_url, service)
    if jwks_url is not None or key_file is not None:
        kid = header.get("kid")
        if jwks_url is not None:
            jwk = _JWKS.get_key(jwks_url, kid if isinstance(kid, str) else None, service, timeout)
            key: Any = jwk.key
            algorithms = [jwk.algorithm_name] if jwk.algorithm_name in _ASYMMETRIC_ALGS else []
            if not algorithms:
                raise TokenError(service, "JWKS key uses an unsupported algorithm")
        else:
            key, algorithms = _load_key_file(Path(str(key_file)), service)
        if header.get("alg") not in algorithms:
            raise TokenError(service, f"token algorithm is not one of {', '.join(algorithms)}")
        try:
            jwt.decode(
                token,
                key,
                algorithms=algorithms,
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenError(service, "token signature invalid") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(service, f"token rejected ({type(exc).__name__})") from None
        signature_checked = True

    moment = time.time() if now is None else now
    exp = _claim_time(claims, "exp", service)
    nbf = _claim_time(claims, "nbf", service)
    expires_at = datetime.fromtimestamp(exp, timezone.utc) if exp is not None else None
    if exp is not None and moment > exp + leeway:
        raise TokenError(service, f"token expired at {_iso(expires_at)}")
    if nbf is not None and moment + leeway < nbf:
        raise TokenError(
            service, f"token not valid before {_iso(datetime.fromtimestamp(nbf, timezone.utc))}"
        )
    if issuer is not None and claims.get("iss") != issuer:
        raise TokenError(service, f"token issuer is not {issuer!r}")
    if audience is not None:
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if audience not in audiences:
            raise TokenError(service, f"token audience does not include {audience!r}")
    return TokenInfo(service, "jwt", expires_at, signature_checked)


def check_settings_token(
    settings: TokenSettings,
    service: str,
    *,
    leeway: float = DEFAULT_LEEWAY,
    now: float | None = None,
) -> TokenInfo:
    """Read the token `settings` point at and check it with the checks they configure."""
    token = TokenSource(settings, service).get()
    return check_token(
        token,
        service=service,
        issuer=settings.issuer,
        audience=settings.audience,
        jwks_url=settings.jwks_url,
        key_file=settings.verify_key_file,
        verify=settings.verify,
        leeway=leeway,
        now=now,
    )


def source_service_name(name: str) -> str:
    """How errors name a data source's API, so token and data errors read alike."""
    return f"data API {name!r}"


def service_tokens(config: FlameConfig) -> list[tuple[str, TokenSettings]]:
    """Every (service name, token settings) this node will use, in start-up order."""
    found: list[tuple[str, TokenSettings]] = []
    if config.broker.url is not None:
        found.append(("broker", config.broker))
    for source in config.data:
        if source.kind != "local":
            found.append((source_service_name(source.name), source))
    if config.storage.endpoint is not None:
        found.append(("storage", config.storage))
    return found


def check_service_tokens(
    config: FlameConfig, *, leeway: float = DEFAULT_LEEWAY, now: float | None = None
) -> list[TokenInfo]:
    """Check every token the node needs; raise `TokenError` for the first bad one.

    Services the config does not use (no broker URL, local data, no storage endpoint) are
    skipped. A service with no token configured reports kind "none": whether it needs one is
    the service's call, and the start-up probe finds out.
    """
    return [
        check_settings_token(settings, service, leeway=leeway, now=now)
        for service, settings in service_tokens(config)
    ]


# --------------------------------------------------------------------------- redaction


def redact(text: str, secrets: Iterable[str], mask: str = "***") -> str:
    """`text` with every secret masked, in any letter case (`flame.utils.redact.redact`)."""
    return _redact(text, secrets, mask)


class RedactingFilter(logging.Filter):
    """A logging filter that masks known secrets in every record it passes.

    Defence in depth: flame never logs a token on purpose, but a third-party library or an
    analyst's f-string might. Attach it to the root handler with `config.secrets()`.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s]

    def add(self, secret: str) -> None:
        if secret:
            self._secrets.append(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        cleaned = redact(message, self._secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self._secrets)
        return True

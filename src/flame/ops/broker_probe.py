"""Talking to the broker and to services the way a node would, for `flame check` and
`flame status`: a clean, short-lived MQTT session and plain TCP reachability, with every
failure turned into the reason an operator searches for and the setting to fix."""

from __future__ import annotations

import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from flame.config import BrokerSettings
from flame.errors import ConfigError, FlameError

__all__ = [
    "BrokerUnavailable",
    "broker_address",
    "broker_username",
    "connect_broker",
    "public_url",
    "stop_client",
    "tcp_reachable",
]


class BrokerUnavailable(FlameError):
    """The broker could not be reached or refused this node; `fix` names the setting."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


# ------------------------------------------------------------------------- network helpers


def _socket_reason(exc: BaseException, timeout: float) -> str:
    """Why a connection failed, in the words an operator searches for."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "host not found"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or type(exc).__name__})"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the server"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


def tcp_reachable(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection opens, else the reason it did not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return _socket_reason(exc, timeout)


def broker_address(url: str) -> tuple[str, int, bool, str]:
    """(host, port, tls, protocol) as the MQTT transport reads the URL; ConfigError if bad."""
    from flame.clients.broker_address import parse_broker_url

    try:
        address = parse_broker_url(url)
    except ValueError as exc:
        raise ConfigError(f"FLAME_BROKER__URL / broker.url: {exc}") from None
    return address.host, address.port, address.tls, address.protocol


def public_url(url: str) -> str:
    """The URL without user info, so a password in it never reaches the screen."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=host).geturl()


_CONNACK_FIXES = {
    "bad user name or password": "check FLAME_BROKER__USERNAME and FLAME_BROKER__TOKEN(_FILE)",
    "not authorized": "check FLAME_BROKER__USERNAME and FLAME_BROKER__TOKEN(_FILE)",
}


def connect_broker(
    settings: BrokerSettings,
    *,
    timeout: float,
    client_id: str | None = None,
    username: str | None = None,
    token: str | None = None,
    on_message: Callable[[Any, Any, Any], None] | None = None,
) -> Any:
    """A connected paho client (network loop running) or `BrokerUnavailable`.

    The protocol is the one the node's transport would use; the session is clean (MQTT 5:
    clean start, no expiry) so nothing stays behind on the broker. Stop it with `stop_client`.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    if settings.url is None:
        raise BrokerUnavailable("no broker configured", "set FLAME_BROKER__URL")
    host, port, tls, protocol = broker_address(settings.url)
    v5 = protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"flame-{uuid.uuid4().hex[:12]}",
        clean_session=None if v5 else True,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        reconnect_on_failure=False,
    )
    client.connect_timeout = timeout
    if username is not None or token is not None:
        client.username_pw_set(username or "", token)
    if tls:
        try:
            client.tls_set(
                ca_certs=str(settings.ca_file) if settings.ca_file else None,
                certfile=str(settings.cert_file) if settings.cert_file else None,
                keyfile=str(settings.key_file) if settings.key_file else None,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise BrokerUnavailable(
                f"TLS files unusable ({_socket_reason(exc, timeout)})",
                "check FLAME_BROKER__CA_FILE / __CERT_FILE / __KEY_FILE",
            ) from None
    answered = threading.Event()
    outcome: dict[str, Any] = {}

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        outcome["reason"] = reason
        answered.set()

    client.on_connect = on_connect
    if on_message is not None:
        client.on_message = on_message
    try:
        if v5:
            client.connect(host, port, keepalive=max(10, int(timeout * 4)), clean_start=True)
        else:
            client.connect(host, port, keepalive=max(10, int(timeout * 4)))
    except (OSError, ssl.SSLError) as exc:
        raise BrokerUnavailable(_socket_reason(exc, timeout), "check FLAME_BROKER__URL") from None
    client.loop_start()
    if not answered.wait(timeout):
        stop_client(client)
        raise BrokerUnavailable(
            f"no MQTT answer within {timeout:g} s (is it an MQTT port?)", "check FLAME_BROKER__URL"
        )
    reason = outcome["reason"]
    if getattr(reason, "is_failure", False):
        stop_client(client)
        text = str(reason).lower()
        fix = _CONNACK_FIXES.get(text, "check the broker's settings for this node")
        if text == "not authorized":
            text = "not authorized: bad user name or password, or this user may not connect"
        raise BrokerUnavailable(f"connection refused by the broker ({text})", fix)
    return client


def broker_username(settings: BrokerSettings, node_id: str | None, token: str | None) -> str | None:
    """The user name the node's transport presents: configured, else the node id with a token."""
    if settings.username is not None:
        return settings.username
    return node_id if token is not None else None


def stop_client(client: Any) -> None:
    """Disconnect and stop the network loop of a client from `connect_broker`."""
    try:
        client.disconnect()
    finally:
        client.loop_stop()

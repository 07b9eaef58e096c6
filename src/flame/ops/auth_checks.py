"""`flame check` items for authenticated federation: identity, roster, live inbox isolation.

The isolation probe is live, not a reading of the ACL: as this node's broker user it
publishes a retained probe to the inbox topic of a node that does not exist and subscribes
to it; if the probe arrives, this node could read other nodes' mail (FAIL). The retained
probe is cleared afterwards, so nothing stays on the broker.
"""

from __future__ import annotations

import ipaddress
import secrets
import threading
from typing import TYPE_CHECKING, Any

from flame.errors import ConfigError, FlameError
from flame.ops.broker_probe import (
    BrokerUnavailable,
    broker_address,
    broker_username,
    connect_broker,
    stop_client,
)
from flame.ops.check_items import CheckItem

if TYPE_CHECKING:
    from flame.config import FlameConfig

__all__ = ["check_identity", "check_isolation", "check_plain_password"]


def check_identity(config: FlameConfig) -> list[CheckItem]:
    """The roster parses, this node is in it in its role, and its key file matches it."""
    from flame.identity import Authenticator, Identity, Roster, check_members

    if config.roster is None or config.identity.key_file is None:
        if config.allow_unsigned:
            return [
                CheckItem(
                    "ok",
                    "identity",
                    detail="UNSIGNED (FLAME_ALLOW_UNSIGNED=true): messages are not authenticated",
                )
            ]
        return [
            CheckItem(
                "FAIL",
                "identity",
                detail="no FLAME_ROSTER / FLAME_IDENTITY__KEY_FILE",
                fix="flame keys identity NODE_ID --out DIR; flame roster add ...",
            )
        ]
    items = []
    try:
        roster = Roster.load(config.roster)
    except ConfigError as exc:
        return [CheckItem("FAIL", "roster", str(config.roster), str(exc))]
    detail = f"{len(roster)} members, SHA-256 {roster.fingerprint}"
    items.append(CheckItem("ok", "roster", str(config.roster), detail))
    node = config.node_id or ""
    try:
        check_members(roster, config.aggregator_id, config.participants)
        if config.role is not None:
            roster.require(node, config.role, "FLAME_NODE_ID")
        identity = Identity.load(node, config.identity.key_file)
        Authenticator(identity, roster)
    except FlameError as exc:
        items.append(CheckItem("FAIL", "identity", str(config.identity.key_file), str(exc)))
        return items
    items.append(
        CheckItem("ok", "identity", str(config.identity.key_file), f"{node}: matches the roster")
    )
    return items


def _loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_plain_password(config: FlameConfig) -> CheckItem | None:
    """A FAIL-free warning line: a password over plain mqtt:// to another machine."""

    url = config.broker.url
    if url is None or (config.broker.token is None and config.broker.token_file is None):
        return None
    host, _, tls, _ = broker_address(url)
    if tls or _loopback(host):
        return None
    return CheckItem(
        "ok",
        "broker transport",
        detail=f"WARNING: the broker password travels unencrypted to {host} (mqtt://); "
        "use mqtts:// (TLS)",
    )


def check_isolation(config: FlameConfig, timeout: float) -> CheckItem:
    """Live: can this node's broker user read an inbox that is not its own?"""
    from flame.clients.token import TokenSource

    settings = config.broker
    probe_node = f"flame-probe-{secrets.token_hex(6)}"
    topic = f"flame/{config.analysis_id}/{probe_node}/inbox"
    marker = secrets.token_bytes(16)
    arrived = threading.Event()
    subscribed = threading.Event()
    refused: list[bool] = []

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        if message.payload == marker:
            arrived.set()

    try:
        token = TokenSource(settings, "broker").get()
        client = connect_broker(
            settings,
            timeout=timeout,
            client_id=f"flame-check-iso-{secrets.token_hex(6)}",
            username=broker_username(settings, config.node_id, token),
            token=token,
            on_message=on_message,
        )
    except BrokerUnavailable as exc:
        return CheckItem("skip", "inbox isolation", detail=f"not tried: {exc.reason}")
    except FlameError as exc:
        return CheckItem("skip", "inbox isolation", detail=f"not tried: {exc}")

    def on_subscribe(_c: Any, _u: Any, _mid: Any, codes: Any, _p: Any = None) -> None:
        refused.extend(bool(getattr(code, "is_failure", False)) for code in codes)
        subscribed.set()

    client.on_subscribe = on_subscribe
    try:
        published = client.publish(topic, marker, qos=1, retain=True)
        published.wait_for_publish(timeout)
        client.subscribe(topic, qos=1)
        subscribed.wait(timeout)
        got = arrived.wait(min(timeout, 2.0)) if not any(refused) else False
        client.publish(topic, b"", qos=1, retain=True).wait_for_publish(timeout)  # clear it
    except (RuntimeError, ValueError, OSError) as exc:
        return CheckItem("skip", "inbox isolation", detail=f"probe failed: {exc}")
    finally:
        stop_client(client)
    if got:
        return CheckItem(
            "FAIL",
            "inbox isolation",
            topic,
            "this node read another node's inbox: the broker ACL does not isolate inboxes",
            "use the ACL from `flame broker config --roster R --out DIR`",
        )
    how = "subscription refused" if any(refused) else "probe not delivered"
    return CheckItem("ok", "inbox isolation", detail=f"other inboxes are not readable ({how})")

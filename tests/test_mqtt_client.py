"""The MQTT client against a real broker: auth, ACL, TLS, errors, reconnects."""

from __future__ import annotations

import threading
import time

import pytest
from broker import ADMIN, Broker, free_port

from flame.clients.message_broker_client import (
    BrokerAddress,
    MessageBrokerClient,
    broker_connection,
    parse_broker_url,
)
from flame.errors import TransportError


def client_for(broker: Broker, user: str, **options: object) -> MessageBrokerClient:
    values: dict[str, object] = {
        "client_id": f"test-{user}-{time.monotonic_ns()}",
        "username": user,
        "password": lambda: broker.password,
        "connect_timeout": 5.0,
    }
    values.update(options)
    return MessageBrokerClient(broker.url, **values)  # type: ignore[arg-type]


# --- URL parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker:1884", BrokerAddress("broker", 1884, False)),
        ("mqtts://broker", BrokerAddress("broker", 8883, True)),
        ("broker.example.org:1999", BrokerAddress("broker.example.org", 1999, False)),
        ("broker", BrokerAddress("broker", 1883, False)),
        ("tcp://10.0.0.1:1883", BrokerAddress("10.0.0.1", 1883, False)),
        ("ssl://h:8884", BrokerAddress("h", 8884, True)),
        ("mqtt://[::1]:1883", BrokerAddress("::1", 1883, False)),
        ("mqtt://h:1883?protocol=3.1.1", BrokerAddress("h", 1883, False, "3.1.1")),
    ],
)
def test_parse_broker_url(url: str, expected: BrokerAddress) -> None:
    assert parse_broker_url(url) == expected


def test_address_text_is_what_errors_show() -> None:
    assert str(parse_broker_url("broker:1999")) == "mqtt://broker:1999"
    assert str(parse_broker_url("mqtts://[::1]")) == "mqtts://[::1]:8883"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("", "empty"),
        ("http://h:80", "scheme"),
        ("ws://h:80", "scheme"),
        ("mqtt://h:notaport", "port"),
        ("mqtt://h:1883/path", "path"),
        ("mqtt://h:1883?color=red", "option"),
        ("mqtt://h:1883?protocol=4", "protocol"),
        ("mqtt://:1883", "no host"),
    ],
)
def test_parse_broker_url_rejects(url: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_broker_url(url)


def test_credentials_in_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(ValueError) as info:
        parse_broker_url("mqtt://user:s3cr3t-token@h:1883")
    assert "s3cr3t-token" not in str(info.value)
    assert "credentials" in str(info.value)


# --- connecting -------------------------------------------------------------------------------


def test_connect_publish_subscribe_round_trip(mqtt_broker: Broker) -> None:
    receiver = client_for(mqtt_broker, ADMIN)
    sender = client_for(mqtt_broker, ADMIN)
    receiver.connect()
    sender.connect()
    try:
        receiver.subscribe([("flame/t/client/+", 1)], timeout=5)
        sender.publish("flame/t/client/x", b"hello", timeout=5)
        message = receiver.get(5)
        assert message is not None
        assert (message.topic, bytes(message.payload), message.qos) == (
            "flame/t/client/x",
            b"hello",
            1,
        )
        receiver.ack(message)
        assert receiver.get(0.2) is None
    finally:
        sender.disconnect()
        receiver.disconnect()


def test_wrong_password_is_refused_clearly(mqtt_broker: Broker) -> None:
    if not mqtt_broker.supports_acl:
        pytest.skip("amqtt runs without a password file")
    wrong = "wrong-" + mqtt_broker.password
    client = client_for(mqtt_broker, "alice", password=lambda: wrong)
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        client.connect()
    message = str(info.value)
    assert message.startswith(
        f"broker mqtt://127.0.0.1:{mqtt_broker.port} refused the connection: "
    )
    assert "bad user name or password" in message
    assert wrong not in message and mqtt_broker.password not in message
    assert time.monotonic() - started < 4, "a refusal must not be retried until the timeout"
    assert "\n" not in message


def test_unreachable_broker_names_host_and_port() -> None:
    port = free_port()
    client = MessageBrokerClient(f"mqtt://127.0.0.1:{port}", client_id="nobody", connect_timeout=1)
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        client.connect()
    assert time.monotonic() - started < 5
    assert f"cannot connect to broker mqtt://127.0.0.1:{port}: connection refused" in str(
        info.value
    )


def test_connect_waits_for_a_broker_that_is_starting() -> None:
    with Broker(auth=False) as broker:
        broker.stop()
        client = MessageBrokerClient(broker.url, client_id="early", connect_timeout=10)
        starter = threading.Timer(0.5, broker.start)
        starter.start()
        try:
            client.connect()
            assert client.connected
        finally:
            starter.join(15)
            client.disconnect()


def test_token_source_is_read_again_at_every_reconnect(fresh_broker: Broker) -> None:
    calls: list[float] = []

    def token() -> str:
        calls.append(time.monotonic())
        return fresh_broker.password

    client = client_for(fresh_broker, "alice", password=token, reconnect_delay=(1, 2))
    client.connect()
    try:
        before = len(calls)
        fresh_broker.restart()
        assert client.wait_connected(0.1) is False or len(calls) >= before
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (client.connected and len(calls) > before):
            time.sleep(0.05)
        assert client.connected
        assert len(calls) > before, "the token source was not consulted on reconnect"
    finally:
        client.disconnect()


def test_publish_times_out_naming_the_topic_when_the_broker_is_gone(fresh_broker: Broker) -> None:
    client = client_for(fresh_broker, ADMIN, reconnect_delay=(1, 2))
    client.connect()
    try:
        fresh_broker.stop()
        deadline = time.monotonic() + 5
        while client.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        with pytest.raises(TransportError) as info:
            client.publish("flame/t/x/inbox", b"late", timeout=0.5)
        assert time.monotonic() - started < 3
        assert "flame/t/x/inbox" in str(info.value)
        assert "within 0.5 s" in str(info.value)
    finally:
        client.disconnect()


def test_broker_connection_yields_consume_and_dispatch(mqtt_broker: Broker) -> None:
    options = {"username": ADMIN, "password": lambda: mqtt_broker.password}
    with broker_connection(
        mqtt_broker.url, client_id="cm-test", topics=["flame/cm/+/inbox"], **options
    ) as (consume, dispatch):
        dispatch("flame/cm/n1/inbox", b"payload-1")
        message = consume(5)
        assert message is not None and bytes(message.payload) == b"payload-1"
        assert consume(0.1) is None


# --- ACL --------------------------------------------------------------------------------------


def test_acl_node_cannot_subscribe_to_another_nodes_inbox(mqtt_broker: Broker) -> None:
    if not mqtt_broker.supports_acl:
        pytest.skip("ACLs need mosquitto (amqtt fallback has none)")
    mallory = client_for(mqtt_broker, "mallory")
    alice = client_for(mqtt_broker, "alice")
    sender = client_for(mqtt_broker, "bob")
    for client in (mallory, alice, sender):
        client.connect()
    try:
        # The direct attempt and a wildcard. Mosquitto's file ACL (2.0) grants the SUBSCRIBE and
        # enforces at delivery; another broker may answer with a failure code. Either way the
        # proof is below: nothing of alice's ever reaches mallory.
        refused = []
        for topic in ("flame/acl/alice/inbox", "flame/acl/+/inbox", "#"):
            try:
                mallory.subscribe([(topic, 1)], timeout=5)
            except TransportError as exc:
                assert "not authorized" in str(exc)
                refused.append(topic)
        alice.subscribe([("flame/acl/alice/inbox", 1)], timeout=5)
        mallory.subscribe([("flame/acl/mallory/inbox", 1)], timeout=5)  # her own: allowed
        sender.publish("flame/acl/alice/inbox", b"for alice only", timeout=5)
        received = alice.get(5)
        assert received is not None and bytes(received.payload) == b"for alice only"
        # Retained statuses of other tests may reach her '#' (statuses are readable by all);
        # what must never arrive is anything from alice's inbox.
        seen = []
        deadline = time.monotonic() + 1.0
        while (message := mallory.get(max(deadline - time.monotonic(), 0.0))) is not None:
            seen.append(message.topic)
        assert "flame/acl/alice/inbox" not in seen, f"mallory read alice's inbox ({refused})"
        # Nor can mallory forge alice's presence.
        with pytest.raises(TransportError, match="not authorized"):
            mallory.publish("flame/acl/alice/status", b'{"state":"offline"}', timeout=5)
    finally:
        for client in (mallory, alice, sender):
            client.disconnect()


# --- TLS --------------------------------------------------------------------------------------


def test_tls_with_the_generated_ca(mqtt_broker: Broker) -> None:
    if not mqtt_broker.supports_tls or mqtt_broker.tls is None:
        pytest.skip("TLS needs mosquitto (amqtt fallback has none)")
    url = mqtt_broker.tls_url
    client = MessageBrokerClient(
        url,
        client_id="tls-test",
        username=ADMIN,
        password=lambda: mqtt_broker.password,
        ca_file=mqtt_broker.tls.ca_file,
        connect_timeout=5,
    )
    client.connect()
    try:
        client.subscribe([("flame/tls/x/inbox", 1)], timeout=5)
        client.publish("flame/tls/x/inbox", b"over tls", timeout=5)
        message = client.get(5)
        assert message is not None and bytes(message.payload) == b"over tls"
    finally:
        client.disconnect()


def test_tls_with_a_client_certificate(mqtt_broker: Broker) -> None:
    if not mqtt_broker.supports_tls or mqtt_broker.tls is None:
        pytest.skip("TLS needs mosquitto (amqtt fallback has none)")
    tls = mqtt_broker.tls
    common = {
        "username": ADMIN,
        "password": lambda: mqtt_broker.password,
        "ca_file": tls.ca_file,
        "connect_timeout": 3,
    }
    client = MessageBrokerClient(
        mqtt_broker.mtls_url,
        client_id="mtls-test",
        cert_file=tls.client_cert,
        key_file=tls.client_key,
        **common,  # type: ignore[arg-type]
    )
    client.connect()
    client.disconnect()
    common["connect_timeout"] = 1
    without = MessageBrokerClient(mqtt_broker.mtls_url, client_id="mtls-none", **common)  # type: ignore[arg-type]
    with pytest.raises(TransportError, match=f"broker {mqtt_broker.mtls_url}"):
        without.connect()


def test_tls_with_an_unknown_ca_fails_clearly(mqtt_broker: Broker) -> None:
    if not mqtt_broker.supports_tls or mqtt_broker.tls is None:
        pytest.skip("TLS needs mosquitto (amqtt fallback has none)")
    client = MessageBrokerClient(
        mqtt_broker.tls_url,
        client_id="tls-bad-ca",
        username=ADMIN,
        password=lambda: mqtt_broker.password,
        connect_timeout=3,
    )
    with pytest.raises(TransportError) as info:
        client.connect()
    assert f"cannot connect to broker {mqtt_broker.tls_url}: TLS handshake failed" in str(
        info.value
    )


def test_missing_tls_file_is_named() -> None:
    with pytest.raises(TransportError, match=r"CA file /nonexistent/ca\.pem does not exist"):
        MessageBrokerClient("mqtts://h", client_id="x", ca_file="/nonexistent/ca.pem")

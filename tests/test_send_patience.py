"""How long a send waits for the broker, and what its error says (no broker needed)."""

from __future__ import annotations

from flame.config import BrokerSettings
from flame.errors import NotAcknowledged, TransportError
from flame.transport.mqtt import MqttTransport, wrap_send_error


def _transport(**settings: object) -> MqttTransport:
    return MqttTransport(BrokerSettings(url="mqtt://127.0.0.1:1", **settings), "a", "n")


def test_the_wait_scales_with_the_message_size() -> None:
    transport = _transport(send_timeout=30, min_send_rate=16 * 1024)
    assert transport.patience(0) == 30
    assert transport.patience(1024 * 1024) == 30 + 64  # 1 MiB at 16 KiB/s
    assert transport.patience(1024 * 1024, 5) == 5 + 64  # a shorter base (a re-send)


def test_not_acknowledged_keeps_its_kind_and_names_the_settings() -> None:
    late = wrap_send_error(NotAcknowledged("broker x did not acknowledge"), "cannot send to 'a'")
    assert isinstance(late, NotAcknowledged)
    assert "FLAME_BROKER__SEND_TIMEOUT" in str(late) and "FLAME_BROKER__MIN_SEND_RATE" in str(late)
    refused = wrap_send_error(TransportError("broker x refused"), "cannot send to 'a'")
    assert type(refused) is TransportError  # a refusal is final: nobody re-sends it

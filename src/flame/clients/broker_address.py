"""Where the MQTT broker is: a broker URL read into a `BrokerAddress`.

Why a module of its own: the address is needed without a connection too (`flame check`'s
broker probe, the benchmarks), and parsing it is where credentials in a URL are refused, so
they cannot leak into the logs that name the broker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, urlsplit

__all__ = ["BrokerAddress", "ProtocolName", "parse_broker_url"]

ProtocolName = Literal["5", "3.1.1"]

_SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True, "tls": True}
_PROTOCOLS: dict[str, ProtocolName] = {"5": "5", "5.0": "5", "3.1.1": "3.1.1", "311": "3.1.1"}


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is. `str()` is the form used in every log line and error."""

    host: str
    port: int
    tls: bool
    protocol: ProtocolName = "5"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://host:1883`, `mqtts://host:8883`, `host:port` or `host`; `?protocol=3.1.1` opts
    out of MQTT 5 for brokers without it (amqtt). Credentials in the URL are refused so they
    cannot leak into logs; they belong in the username and token settings."""
    text = url.strip()
    if not text:
        raise ValueError("broker URL is empty")
    if "://" not in text:
        text = "mqtt://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(
            "broker URL has an invalid port; expected mqtt://host:port or mqtts://host:port"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"broker URL scheme {scheme!r} is not supported; use mqtt:// or mqtts://")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "broker URL must not contain credentials; set the broker username and token instead"
        )
    if not parts.hostname:
        raise ValueError("broker URL has no host; expected mqtt://host:port")
    if parts.path not in ("", "/"):
        raise ValueError("broker URL must not have a path (websockets are not supported)")
    tls = _SCHEMES[scheme]
    protocol: ProtocolName = "5"
    query = parse_qs(parts.query)
    for key, values in query.items():
        if key != "protocol":
            raise ValueError(f"broker URL option {key!r} is unknown (known: protocol)")
        if values[-1] not in _PROTOCOLS:
            raise ValueError("broker URL option protocol must be 5 or 3.1.1")
        protocol = _PROTOCOLS[values[-1]]
    return BrokerAddress(parts.hostname, port or (8883 if tls else 1883), tls, protocol)

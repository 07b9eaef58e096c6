"""The transport interface the federated layer talks to; it knows nothing of MQTT.

Semantics every implementation keeps (the broker's, so simulation behaves like production):
* each node has an inbox; `send` returns once the message is accepted for delivery
  (for MQTT: PUBACK) or raises `TransportError` naming the recipient;
* delivery is at least once and a node's inbox survives its reconnects (persistent session);
* every node has a retained status; a node that dies is marked `offline` (last will), and
  status changes of watched nodes arrive in the inbox as envelopes of kind `status`;
* `receive` decodes and validates; a malformed frame is logged and dropped, never raised.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any

from flame.messages import Envelope

__all__ = ["Transport"]


class Transport(abc.ABC):
    """One node's connection to the federation."""

    def __init__(self, analysis_id: str, node_id: str) -> None:
        self.analysis_id = analysis_id
        self.node_id = node_id
        self.bytes_sent = 0  # frame bytes of envelopes sent / received: per-epoch metrics
        self.bytes_received = 0

    @abc.abstractmethod
    def connect(self, status: dict[str, Any]) -> None:
        """Join: register the last will, then publish `status` as this node's retained state."""

    @abc.abstractmethod
    def close(self) -> None:
        """Leave cleanly and release the connection. The retained status left behind keeps a
        final state (`done`/`failed`, marked `"online": false`); any other becomes `offline`."""

    @abc.abstractmethod
    def send(self, envelope: Envelope, timeout: float | None = None) -> None:
        """Put `envelope` into its recipient's inbox; block until accepted or raise."""

    @abc.abstractmethod
    def receive(self, timeout: float) -> Envelope | None:
        """The next valid envelope for this node, or None when `timeout` seconds pass."""

    @abc.abstractmethod
    def announce(self, status: dict[str, Any]) -> None:
        """Replace this node's retained status (e.g. `{"state": "computing", "epoch": 2}`)."""

    @abc.abstractmethod
    def watch(self, nodes: Iterable[str] | None = None) -> None:
        """Deliver status changes of these nodes (all when None) as `status` envelopes."""

    def post(self, envelope: Envelope) -> None:
        """Send without waiting for the broker to accept it, for small best-effort messages
        on a hot path (the aggregator's result acks: a lost one only costs a re-send)."""
        self.send(envelope)

    @property
    def link(self) -> int:
        """How many times the broker lost this node's session (restart without persistence):
        messages queued for the node then are gone, so unacknowledged ones must be re-sent."""
        return 0

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

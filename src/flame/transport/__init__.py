"""How envelopes move between nodes: one interface, a memory and an MQTT implementation."""

from flame.transport.base import Transport
from flame.transport.memory import MemoryBroker, MemoryTransport

__all__ = ["MemoryBroker", "MemoryTransport", "Transport"]

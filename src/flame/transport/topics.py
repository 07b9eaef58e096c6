"""MQTT topic names and client ids of a run (DESIGN.md): one place, for the transport and
its process-claim checks."""

from __future__ import annotations

import hashlib
import re

__all__ = ["VALID_NAME", "broadcast_topic", "client_id_for", "inbox_topic", "status_topic"]

# An analysis or node id that can stand as one topic level (no wildcard, no separator).
VALID_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def inbox_topic(analysis_id: str, node_id: str) -> str:
    return f"flame/{analysis_id}/{node_id}/inbox"


def status_topic(analysis_id: str, node_id: str) -> str:
    return f"flame/{analysis_id}/{node_id}/status"


def broadcast_topic(analysis_id: str) -> str:
    """The aggregator's messages to every node (`EVERYONE`); one level shorter than a node's
    topics, so it can never be mistaken for, or matched as, a node's inbox or status."""
    return f"flame/{analysis_id}/broadcast"


def client_id_for(analysis_id: str, node_id: str) -> str:
    """Stable across restarts (so the persistent session is found again) and one per node.

    ':' cannot occur in either name, so two different pairs never share a client id.
    """
    client_id = f"flame:{analysis_id}:{node_id}"
    if len(client_id) <= 128:
        return client_id
    return "flame:" + hashlib.sha256(f"{analysis_id}:{node_id}".encode()).hexdigest()[:40]

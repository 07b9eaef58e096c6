"""Shared fixtures: real servers on loopback (HTTP data API, S3) from tests/servers, and the
real MQTT broker from tests/broker.py."""

from __future__ import annotations

pytest_plugins = ["servers.plugin", "broker"]

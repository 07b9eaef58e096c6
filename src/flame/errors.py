"""Errors a user of flame can catch. One base class so `except FlameError` covers them all."""

from __future__ import annotations


class FlameError(Exception):
    """Base class of every error flame raises on purpose."""


class ConfigError(FlameError):
    """The configuration is invalid; the message lists every wrong field."""


class AnalysisLoadError(FlameError):
    """The analysis code could not be found or imported."""


class DataError(FlameError):
    """A node's data could not be read."""


class MessageError(FlameError):
    """A message from the wire was malformed; it is dropped, never acted on."""


class TransportError(FlameError):
    """The transport could not deliver or receive within its deadline."""


class RunTimeout(FlameError):
    """A wait passed its deadline (presence, epoch results, aggregation)."""


class RunFailed(FlameError):
    """The federated run stopped; the message says which node failed and why."""

    def __init__(self, reason: str, *, node: str | None = None, epoch: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.node = node
        self.epoch = epoch


class AnalysisError(FlameError):
    """`analyze` raised in the analysis child: its exception type, message and traceback.

    `str()` is the original message; `remote_type` the original exception's type name;
    `traceback_text` the formatted frames of the analysis code only (flame's own left out).
    """

    def __init__(self, remote_type: str, message: str, traceback_text: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.message = message
        self.traceback_text = traceback_text


class PolicyRefused(FlameError):
    """The node policy refused to release a result; the message names the field and rule."""

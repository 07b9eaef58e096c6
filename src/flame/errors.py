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


class NotAcknowledged(TransportError):
    """The broker has not acknowledged a message yet: not a refusal. The client keeps it
    queued (it goes out after a reconnect), so callers with a later deadline of their own (a
    node's result, the aggregator's kick-off) keep waiting or re-send instead of giving up."""


class RunTimeout(FlameError):
    """A wait passed its deadline (presence, epoch results, aggregation)."""


class RunFailed(FlameError):
    """The federated run stopped; the message says which node failed and why."""

    def __init__(
        self,
        reason: str,
        *,
        node: str | None = None,
        epoch: int | None = None,
        traceback: str | None = None,
    ):
        super().__init__(reason)
        self.reason = reason
        self.node = node
        self.epoch = epoch
        self.traceback = traceback  # the failing analysis's frames, when its node sent them


class Stopped(KeyboardInterrupt):
    """The process was told to stop (SIGTERM; SIGINT arrives as a plain KeyboardInterrupt)."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = exit_code


def stop_signal(exc: BaseException) -> str:
    """The signal behind a KeyboardInterrupt: `SIGTERM` for `Stopped`, else `SIGINT`."""
    return exc.signal_name if isinstance(exc, Stopped) else "SIGINT"


def stop_exit_code(exc: BaseException) -> int:
    """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
    return exc.exit_code if isinstance(exc, Stopped) else 130


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


class NotFound(KeyError, FlameError):
    """A missing key whose message names what exists and how to fix it (a `KeyError`, so
    `except KeyError` still works; `str()` is the message, not its quoted repr)."""

    def __init__(self, key: object, message: str) -> None:
        super().__init__(key)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return self.message


class ColumnNotFound(NotFound):
    """`table["nope"]` on a table from `data.read_csv()`: the message lists its columns."""


class ParamNotGiven(NotFound):
    """`flame.context().params["nope"]`: the message says how to pass a run parameter."""

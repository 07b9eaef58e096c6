"""What `analyze` and `aggregate` can reach besides their arguments: `flame.context()`.

The context is per node and per call (a contextvar), so simulated nodes in threads never see
each other's. It carries who and where we are, a seeded random generator, free-form messaging
to other nodes, node-local state and a progress figure.
"""

from __future__ import annotations

import contextvars
import logging
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from flame.errors import FlameError, PolicyRefused
from flame.node.mailbox import RUNTIME_PREFIX, Mailbox
from flame.node.params import Params
from flame.utils.deadline import Deadline
from flame.wire.envelope import Envelope

__all__ = ["Context", "Received", "context"]

log = logging.getLogger(__name__)

RESERVED_PREFIX = RUNTIME_PREFIX  # the runtime's own traffic: unacknowledged, never the analyst's
"""Message categories of flame's own traffic (secure sums, endorsements): not for analyses."""
RESERVED_TAGS = ("flame-", "flame.")
"""Node-state tags of the runtime (compared ignoring case: some storage folds it)."""


def _check_tag(tag: object) -> str:
    if not isinstance(tag, str) or tag.lower().startswith(RESERVED_TAGS):
        raise FlameError(
            f"state tag {tag!r} is reserved for flame's own node state; choose a tag that "
            "does not start with 'flame-' or 'flame.'"
        )
    return tag

T = TypeVar("T")

_current: contextvars.ContextVar[Context] = contextvars.ContextVar("flame_context")


@dataclass(frozen=True)
class Liveness:
    """Who is still there while `Context.receive` waits (the aggregator's presence): a
    sender whose connection ended (its last will) is not waited for until the timeout."""

    watches: Callable[[Envelope], bool]
    """Whether it takes this envelope (status, error report, forwarded logs)."""
    note: Callable[[Envelope], None]
    """Take it (may raise RunFailed: a node's error report, as in any wait)."""
    online: Callable[[str], bool]


@dataclass(frozen=True)
class Received:
    """What `Context.receive` collected: bodies by sender, and who did not answer in time."""

    messages: dict[str, Any]
    missing: list[str]


class Context:
    """The running node, as seen from inside the analyst's functions."""

    def __init__(
        self,
        *,
        analysis_id: str,
        node_id: str,
        role: str,
        participants: list[str],
        aggregator_id: str,
        mailbox: Mailbox,
        seed: int | None = None,
        state: Any = None,
        on_progress: Callable[[float], None] | None = None,
    ) -> None:
        self.analysis_id = analysis_id
        self.node_id = node_id
        self.role = role
        self.participants = list(participants)
        self.aggregator_id = aggregator_id
        self.epoch = 0
        self._mailbox = mailbox
        self._seed = seed
        self._state = state
        self._on_progress = on_progress
        self._progress = 0.0
        self._rng: tuple[int, np.random.Generator] | None = None
        self._params = Params()
        self.outgoing: Callable[[Any], Any] | None = None
        """Set by an analysis node's runtime: the node policy's check of a body `send` is
        about to let leave (returns what may leave, or raises PolicyRefused)."""

    @property
    def params(self) -> dict[str, Any]:
        """The run's parameters (`--param k=v`, FLAME_PARAMS); the same on every node. A
        missing one raises a KeyError saying how to pass it."""
        return self._params

    @params.setter
    def params(self, value: Mapping[str, Any]) -> None:
        self._params = Params(value)

    def params_as(self, model: Callable[..., T]) -> T:
        """The parameters as the analysis's own type: a pydantic model or any `cls(**params)`.

        A pydantic model validates and converts (`bins: int` from "10"); a wrong or missing
        parameter raises its validation error naming the field.
        """
        validate = getattr(model, "model_validate", None)
        if callable(validate):
            return validate(self.params)  # type: ignore[no-any-return]
        return model(**self.params)

    @property
    def rng(self) -> np.random.Generator:
        """One generator per epoch, seeded from (seed, node, epoch): reproducible with --seed."""
        if self._rng is None or self._rng[0] != self.epoch:
            node_salt = zlib.crc32(self.node_id.encode())
            seed = None if self._seed is None else [self._seed, node_salt, self.epoch]
            self._rng = (self.epoch, np.random.default_rng(seed))
        return self._rng[1]

    # --- progress ----------------------------------------------------------------------------
    @property
    def progress(self) -> float:
        return self._progress

    def set_progress(self, fraction: float) -> None:
        """Report how far this node is (0..1, in tenths); it only goes up within an epoch.
        Tenths because the figure leaves the node: finer, it would carry whatever analyze
        put in it (at most ten steps an epoch, and only where the node lets messages out)."""
        number = float(fraction)
        if not math.isfinite(number):
            return
        value = math.floor(min(max(number, 0.0), 1.0) * 10) / 10
        if value > self._progress:
            self._progress = value
            if self._on_progress is not None:
                self._on_progress(value)

    # --- free-form messaging -----------------------------------------------------------------
    def send(
        self, category: str, body: Any, *, to: Iterable[str] | None = None, timeout: float = 30.0
    ) -> set[str]:
        """Send `body` to nodes (default: every other analysis node); return who acknowledged
        in time.

        On an analysis node the body first passes the node's policy, like a result."""
        if not isinstance(category, str) or category.startswith(RESERVED_PREFIX):
            raise FlameError(  # the runtime's secure-sum and endorsement traffic uses these
                f"message category {category!r} is reserved for flame's own messages; "
                f"choose a category that does not start with {RESERVED_PREFIX!r}"
            )
        targets = self._peers() if to is None else list(to)
        if self.outgoing is not None and not set(targets) <= set(self._others()):
            raise PolicyRefused(  # the address would carry what analyze put in it
                "a message recipient is outside this run: analyze sends only to the run's "
                "nodes and its aggregator (rule: messages are checked like results)"
            )
        if self.outgoing is not None:
            body = self.outgoing(body)  # once for all recipients: one noise draw, one charge
        waiting: dict[str, str] = {}
        for node in targets:
            envelope = Envelope(
                self.analysis_id, self.node_id, node, "message", self.epoch, body, category
            )
            self._mailbox.transport.send(envelope, timeout)
            waiting[envelope.id] = node
        acked: set[str] = set()
        deadline = Deadline(timeout)

        def is_ack(envelope: Envelope) -> bool:
            return (
                envelope.kind == "ack"
                and isinstance(envelope.body, dict)
                and (envelope.body.get("ack") in waiting)
            )

        while waiting:
            reply = self._mailbox.next(is_ack, deadline)
            if reply is None:
                break
            acked.add(waiting.pop(reply.body["ack"]))
        return acked

    def receive(
        self, category: str, *, senders: Iterable[str] | None = None, timeout: float = 30.0
    ) -> Received:
        """Wait for one message of `category` from each sender (default: every other analysis
        node)."""
        return self._gather(category, senders, timeout, None)

    def _gather(
        self,
        category: str,
        senders: Iterable[str] | None,
        timeout: float,
        presence: Liveness | None,
    ) -> Received:
        """`receive`; with `presence` (the aggregator's, in its runtime rounds) statuses and
        error reports arriving meanwhile are handed to it, and a sender it no longer sees
        online is not waited for."""
        expected = set(self._peers() if senders is None else senders)
        waiting = set(expected)
        messages: dict[str, Any] = {}
        deadline = Deadline(timeout)

        def wanted(envelope: Envelope) -> bool:
            if (
                envelope.kind == "message"
                and envelope.category == category
                and envelope.sender in waiting
                and envelope.epoch <= self.epoch
            ):
                return True
            return presence is not None and presence.watches(envelope)

        while waiting:
            envelope = self._mailbox.next(wanted, deadline)
            if envelope is None:
                break
            if envelope.kind != "message" or envelope.category != category:
                assert presence is not None  # only it takes anything else
                presence.note(envelope)  # its owner's own handling (may raise RunFailed)
                waiting = {node for node in waiting if presence.online(node)}
                continue
            if envelope.epoch < self.epoch:
                log.info(
                    "dropped a stale %r message from %s (epoch %d)",
                    category,
                    envelope.sender,
                    envelope.epoch,
                )
                continue
            messages[envelope.sender] = envelope.body
            waiting.discard(envelope.sender)
        return Received(messages, sorted(expected - set(messages)))

    def _others(self) -> list[str]:
        everyone = [*self.participants, self.aggregator_id]
        return [node for node in everyone if node != self.node_id]

    def _peers(self) -> list[str]:
        """Default recipients and senders: the other analysis nodes. The aggregator only by
        name (`to=[ctx.aggregator_id]`): it is no analysis peer, never answers a node's
        message round, and a default that included it sent it node-to-node data and made
        every default `send` wait its whole timeout for an acknowledgement."""
        return [node for node in self.participants if node != self.node_id]

    # --- node-local state --------------------------------------------------------------------
    def save(self, tag: str, value: Any) -> None:
        """Keep `value` on this node under `tag` (never sent anywhere; survives a restart)."""
        tag = _check_tag(tag)  # the runtime's own state (the threshold guard) is not reachable
        if self._state is None:
            raise FlameError("this node has no local state store configured")
        self._state.save(tag, value)

    def load(self, tag: str, default: Any = None) -> Any:
        """A value saved earlier on this node, or `default`."""
        tag = _check_tag(tag)
        if self._state is None:
            return default
        return self._state.load(tag, default)


def context() -> Context:
    """The context of the node whose `analyze`/`aggregate` is running now."""
    try:
        return _current.get()
    except LookupError:
        raise FlameError("flame.context() is only available inside analyze or aggregate") from None


@contextmanager
def active(ctx: Context) -> Iterator[Context]:
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)

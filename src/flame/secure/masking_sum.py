"""Masked secure sums inside a run: the aggregator's side (see `flame.secure.masking`).

With the epoch's results in hand (each masked field: a node's signed key advertisement), the
aggregator runs rounds 1-4 of `flame.protocols.masking` for every field at once: one
`flame.secure.mask` message per node and round, answered with `flame.secure.masked`. A node
that does not answer within the epoch timeout, or whose message is refused, has dropped out;
the sum goes on while at least t nodes are left in every round and is that of the nodes whose
masked input arrived. A node's refusal is logged with its reason and named if the sum fails.
With a roster the sessions run carrier-authenticated: every node message is handed to its
session with the sender its signed envelope proved, and must name it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flame.errors import FlameError, RunFailed
from flame.secure.masking import MASK, MASKED, SCHEME, MaskingSettings, signing_keys
from flame.wire.envelope import Envelope, Sealed

if TYPE_CHECKING:
    from flame.identity.signing import Authenticator
    from flame.node.context import Context, Liveness
    from flame.protocols.masking import MaskingServer
    from flame.secure.marked import Results

__all__ = ["MaskingSummer"]

log = logging.getLogger(__name__)

_STEPS = ("keys", "ciphertexts", "survivors", "unmask")


@dataclass
class _Field:
    server: MaskingServer
    shape: tuple[int, ...]
    precision: int


@dataclass
class MaskingSummer:
    """Replaces SecureSummer when FLAME_SECURE__SCHEME=masking (same call, same Results)."""

    settings: MaskingSettings
    timeout: float
    context: Context
    participants: Sequence[str]
    auth: Authenticator | None = None
    refusals: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    """The aggregator's run id (set by the aggregator before each epoch), bound into every
    message: what a node signed in another run is not taken in this one."""
    presence: Liveness | None = None
    """The aggregator's presence, fed while a round waits (set by the aggregator): a node
    gone mid-round is not waited for."""

    def __call__(self, results: dict[str, Any], epoch: int) -> Results:
        from flame.secure.marked import Results, _plain, sealed_fields, strip_sealed

        sealed = sealed_fields(results)
        if not sealed:
            return Results(results)
        self.refusals = {}
        t = self.settings.threshold_for(len(self.participants))
        short = {path for path, by_node in sealed.items() if len(by_node) < t}
        if short == set(sealed):  # nothing to sum: failed as ever, in _open's words
            short = set()
        fields = {}
        for path, by_node in sorted(sealed.items()):
            if path in short:  # one node's extra field does not stop the others' sums
                log.warning(
                    "epoch %d: %r was sealed by %s only, fewer than t = %d: not summed",
                    epoch,
                    path,
                    ", ".join(sorted(by_node)),
                    t,
                )
                continue
            fields[path] = self._open(epoch, path, by_node, t)
        for step in _STEPS:
            self._round(epoch, step, fields)
        plain: dict[str, Any] = {}
        contributors: dict[str, list[str]] = {}
        for path, item in fields.items():
            try:
                total = item.server.result()
            except FlameError as exc:
                raise RunFailed(self._failure(epoch, path, exc), epoch=epoch) from exc
            for node in sorted(item.server.bad_revealers):  # refused, the sum rebuilt without
                self.refusals[node] = f"unmask: revealed shares of {path!r} that were altered"
                log.warning("epoch %d: %s revealed altered shares of %r", epoch, node, path)
            plain[path] = _plain(total.values().reshape(item.shape), item.precision)
            contributors[path] = list(total.contributors)
        for path in sorted(short):  # visible as not summed: no value, no contributor
            contributors[path] = []
        return Results(strip_sealed(results), plain, contributors)

    def _open(self, epoch: int, path: str, by_node: dict[str, Sealed], t: int) -> _Field:
        """A session for one field, fed with the advertisement (round 0) of every node that
        marked it with the encoding (shape, precision, bound) at least t nodes agree on; a
        node with another, another scheme or no valid advertisement is left out and named,
        not the whole sum failed."""
        from flame.protocols.masking import Binding, MaskingServer, ProtocolViolation, Session

        by_node = self._masked_only(epoch, path, by_node, t)
        encodings = {}
        for node, item in sorted(by_node.items()):
            encoding = _encoding(item.data)
            if isinstance(encoding, str):
                self._leave_out(epoch, path, node, f"advertise: its {path!r} {encoding}")
                continue
            encodings[node] = encoding
        by_node = {n: item for n, item in by_node.items() if n in encodings}
        counts: dict[Any, int] = {}
        for encoding in encodings.values():
            counts[encoding] = counts.get(encoding, 0) + 1
        agreed = [e for e, c in counts.items() if c >= t or len(counts) == 1]
        if not agreed:
            why = (
                "no node sent a valid advertisement"
                if not encodings
                else f"the nodes marked {path!r} differently (shape, bound or precision), none "
                f"the same as t = {t} others: every node must mark it with the same "
                "flame.secure(..., bound=, precision=) and FLAME_SECURE__*"
            )
            raise RunFailed(self._failure(epoch, path, FlameError(why)), epoch=epoch)
        shape, precision, bound = agreed[0]  # t is a strict majority: at most one
        for node in sorted(n for n, e in encodings.items() if e != agreed[0]):
            self.refusals[node] = f"advertise: it marked {path!r} unlike {t} other nodes"
            log.warning(
                "epoch %d: left %s out of the sum of %r: %s",
                epoch,
                node,
                path,
                "another shape, bound or precision than the other nodes",
            )
            by_node = {n: item for n, item in by_node.items() if n != node}
        try:
            spec = self.settings.spec_for(float(bound), precision)
            members = sorted(self.participants)
            identity, keys = signing_keys(self.auth, [*members, self.context.node_id])
            session = Session(
                Binding(self.context.analysis_id, epoch, path, self.run_id or ""),
                tuple(members),
                self.settings.threshold_for(len(members)),
                spec,
                self.context.node_id,
            )
            server = MaskingServer(
                session,
                identity=identity,
                identities=keys,
                min_contributors=self.settings.min_contributors,
                length=math.prod(shape) or None,  # a vector of another length is refused
                carrier_authenticated=self.auth is not None,  # the transport verifies senders
            )
        except (FlameError, TypeError, ValueError) as exc:
            raise RunFailed(f"cannot start the masked sum of {path!r}: {exc}", epoch=epoch) from exc
        for node, item in sorted(by_node.items()):
            try:
                server.receive(item.data, sender=node)  # the result's verified sender
            except ProtocolViolation as exc:
                self.refusals[node] = f"advertise: its advertisement was refused: {exc}"
                log.warning("epoch %d: left %s out of the sum of %r: %s", epoch, node, path, exc)
        return _Field(server, tuple(int(s) for s in shape), precision)

    def _round(self, epoch: int, step: str, fields: dict[str, _Field]) -> None:
        """Close the current round of every field, send each node its part, collect."""
        from flame.protocols.masking import ProtocolViolation

        outgoing: dict[str, dict[str, Sealed]] = {}
        for path, item in fields.items():
            try:
                messages = getattr(item.server, step)()
            except FlameError as exc:
                raise RunFailed(self._failure(epoch, path, exc), epoch=epoch) from exc
            encoded: dict[int, Sealed] = {}  # a message the server made once for many nodes
            for node, msg in messages.items():  # (U1's adverts, U3) is encoded once
                if id(msg) not in encoded:  # `messages` holds every msg: ids stay unique
                    encoded[id(msg)] = Sealed(SCHEME, msg.to_bytes())
                outgoing.setdefault(node, {})[path] = encoded[id(msg)]
        transport = self.context._mailbox.transport
        for node, messages in sorted(outgoing.items()):
            transport.send(
                Envelope(
                    self.context.analysis_id,
                    self.context.node_id,
                    node,
                    "message",
                    epoch,
                    {"round": step, "messages": messages},
                    MASK,
                )
            )
        senders = sorted(outgoing)
        received = (
            self.context._gather(MASKED, senders, self.timeout, self.presence)
            if self.presence is not None  # the aggregator's runtime: gone nodes not waited for
            else self.context.receive(MASKED, senders=senders, timeout=self.timeout)
        )
        for node, reply in sorted(received.messages.items()):
            if not isinstance(reply, dict) or "error" in reply or "messages" not in reply:
                reason = str(reply.get("error"))[:300] if isinstance(reply, dict) else "malformed"
                self.refusals[node] = f"{step}: {reason}"
                log.warning(
                    "epoch %d: %s refused the masked sum's %r round: %s", epoch, node, step, reason
                )
                continue
            parts = reply["messages"]
            for path, item in parts.items() if isinstance(parts, dict) else ():
                if path not in fields or not isinstance(item, Sealed):
                    continue
                try:
                    fields[path].server.receive(item.data, sender=node)  # envelope's sender
                except ProtocolViolation as exc:
                    self.refusals[node] = f"{step}: its message was refused: {exc}"
                    log.warning("epoch %d: refused %s's %r message: %s", epoch, node, step, exc)
        if received.missing:
            log.warning(
                "epoch %d: no answer to the masked sum's %r round from %s (dropped out: "
                "offline, or silent until the epoch timeout)",
                epoch,
                step,
                ", ".join(received.missing),
            )

    def _failure(self, epoch: int, path: str, exc: Exception) -> str:
        text = f"the masked secure sum of {path!r} in epoch {epoch} failed: {exc}"
        if self.refusals:
            named = "; ".join(f"{n} ({r})" for n, r in sorted(self.refusals.items()))
            text += f". Refused by: {named}"
        return text[:2000]

    def _masked_only(
        self, epoch: int, path: str, by_node: dict[str, Sealed], t: int
    ) -> dict[str, Sealed]:
        """The items sealed with masking. A node that sealed `path` with another scheme (left
        on paillier, say) is left out and named; when that leaves fewer than t, the run is
        misconfigured and the epoch fails saying so."""
        other = {n: item.scheme for n, item in by_node.items() if item.scheme != SCHEME}
        if other and len(by_node) - len(other) < t:
            schemes = ", ".join(sorted({repr(s[:20]) for s in other.values()}))
            raise RunFailed(
                f"nodes {', '.join(repr(n) for n in sorted(other))} sent {path!r} sealed with "
                f"{schemes}, leaving {len(by_node) - len(other)} masked of the t = {t} needed; "
                "this run sums with masking (every node needs FLAME_SECURE__SCHEME=masking)",
                epoch=epoch,
            )
        for node, scheme in sorted(other.items()):
            self._leave_out(
                epoch,
                path,
                node,
                f"advertise: it sealed {path!r} with {scheme[:20]!r}, not masking (set "
                "FLAME_SECURE__SCHEME=masking on it)",
            )
        return {n: item for n, item in by_node.items() if n not in other}

    def _leave_out(self, epoch: int, path: str, node: str, reason: str) -> None:
        self.refusals[node] = reason
        log.warning("epoch %d: left %s out of the sum of %r: %s", epoch, node, path, reason)


def _encoding(data: bytes) -> tuple[tuple[int, ...], int, float] | str:
    """A node's advertised (shape, precision, bound), or what is wrong with it: no masking
    message, no valid shape or no valid encoding. Only its form is read, never a key."""
    from flame.protocols.masking import Message

    try:
        body = Message.from_bytes(data).body
    except FlameError as exc:
        return f"is malformed ({exc})"
    shape, precision, bound = body.get("shape"), body.get("precision"), body.get("bound")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        return "has no valid shape"
    try:
        value = float(bound) if isinstance(bound, (int, float)) else math.nan
    except OverflowError:
        value = math.nan
    if not isinstance(precision, int) or isinstance(precision, bool):
        return "has no valid precision"
    if isinstance(bound, bool) or not math.isfinite(value):
        return "has no valid bound"
    return tuple(shape), precision, value

"""Masked secure sums inside a run (FLAME_SECURE__SCHEME=masking): the node's side.

A node's `flame.secure(...)` field leaves the node as its signed key advertisement (round 0
of `flame.protocols.masking`), with the field's shape and encoding; the values stay on the
node until the aggregator, having collected the results, drives the other rounds with
`flame.secure.mask` messages, which the node answers (`MaskingNode.answer`) while it waits
for the next epoch. The aggregator's side is `flame.secure.masking_sum`.

With a roster the transport signs and verifies every envelope, so the protocol runs
carrier-authenticated: the node's replies to the aggregator carry no signature of their own
and the aggregator's requests are taken only from envelopes the aggregator signed; what
other nodes read (advertisement, peer statement, consistency signature) stays signed.

The differencing guard (`flame.secure.masking_guard`) is kept by the node, since the
aggregator chooses the survivor set, in its node-local state.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from flame.errors import FlameError
from flame.secure.masking_guard import MaskingGuard
from flame.wire.envelope import Envelope, Sealed

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from flame.config import SecureAggregationSettings
    from flame.identity.signing import Authenticator
    from flame.protocols.masking import MaskingClient
    from flame.protocols.paillier import SecureSumSpec
    from flame.secure.guard import NodeLocalState

__all__ = ["MASK", "MASKED", "SCHEME", "MaskingNode", "MaskingSettings", "signing_keys"]

log = logging.getLogger(__name__)

SCHEME = "masking"
MASK = "flame.secure.mask"
MASKED = "flame.secure.masked"
ROUND_OF_STEP = {
    "keys": "share",
    "ciphertexts": "masked",
    "survivors": "consistency",
    "unmask": "reveal",
}


@dataclass(frozen=True)
class MaskingSettings:
    """What the nodes and the aggregator of a masked run agree on."""

    spec: SecureSumSpec
    min_contributors: int = 2
    threshold: int | None = None
    """t; default floor(2n/3) + 1 of the n analysis nodes (n/3 colluding nodes tolerated)."""
    allow_changing_contributors: bool = False

    @classmethod
    def from_settings(cls, settings: SecureAggregationSettings) -> MaskingSettings:
        from flame.secure.keys import SecureKeys

        return cls(
            SecureKeys.spec_of(settings),
            settings.min_contributors,
            getattr(settings, "masking_threshold", None),
            settings.allow_changing_contributors,
        )

    def threshold_for(self, participants: int) -> int:
        if self.threshold is not None:
            return self.threshold
        return min(participants, 2 * participants // 3 + 1)

    def spec_for(self, bound: float | None, precision: int | None) -> SecureSumSpec:
        if bound is None and precision is None:
            return self.spec
        return self.spec.with_overrides(bound=bound, precision=precision)


def signing_keys(
    auth: Authenticator | None, members: Sequence[str]
) -> tuple[Ed25519PrivateKey | None, dict[str, Ed25519PublicKey] | None]:
    """This party's identity key and the roster keys of `members` (None, None: no roster)."""
    if auth is None:
        return None, None
    keys = {}
    for node in members:
        member = auth.roster.get(node)
        if member is None:
            raise FlameError(f"masked secure sum: {node!r} is not in the roster")
        keys[node] = member.public_key
    return auth.identity.key, keys


@dataclass
class _Pending:
    client: MaskingClient
    values: Any
    length: int


class MaskingNode:
    """One analysis node's masked fields: sealed into its result, answered round by round."""

    def __init__(
        self,
        settings: MaskingSettings,
        analysis_id: str,
        node_id: str,
        participants: Sequence[str],
        aggregator_id: str,
        auth: Authenticator | None = None,
        state: NodeLocalState | None = None,
    ) -> None:
        self.settings = settings
        self.analysis_id = analysis_id
        self.node_id = node_id
        self.participants = tuple(sorted(participants))
        self.aggregator_id = aggregator_id
        self._identity, self._keys = signing_keys(auth, [*self.participants, aggregator_id])
        self.carrier_authenticated = auth is not None  # the transport verifies every envelope
        self._pending: dict[tuple[int, str], _Pending] = {}
        self.guard = MaskingGuard(
            analysis_id,
            node_id,
            state=state,
            identity=self._identity,
            allow_changing=settings.allow_changing_contributors,
        )
        self._lock = threading.Lock()

    def seal(self, result: Any, epoch: int, run: str | None = None) -> Any:
        """Every `flame.secure(...)` in `result` -> its signed key advertisement; the values
        are checked against their bound now (before anything is masked) and kept here.
        `run`: the run id of the kick-off this node follows, bound into every message."""
        from flame.protocols.masking import Binding, MaskingClient, RingInput, Session
        from flame.protocols.paillier import SecureAggregationError, ValueOutOfBoundsError
        from flame.secure.marked import Secure, _replace

        def change(path: str, value: Any) -> Any:
            if not isinstance(value, Secure):
                return value
            field = path or "value"
            try:
                session = Session(
                    Binding(self.analysis_id, epoch, path, run or ""),
                    self.participants,
                    self.settings.threshold_for(len(self.participants)),
                    self.settings.spec_for(value.bound, value.precision),
                    self.aggregator_id,
                )
                spec = session.spec  # narrowed to the participants: the ring the sum uses
                encoded = RingInput.encode(value.values, spec, field=field)
            except ValueOutOfBoundsError as exc:
                raise ValueOutOfBoundsError(
                    f"{exc}; raise the bound with flame.secure(value, bound=...) or "
                    "FLAME_SECURE__BOUND (nothing was masked or sent)",
                    field=exc.field,
                    index=exc.index,
                ) from None
            except SecureAggregationError as exc:
                raise FlameError(f"flame.secure(...) at {field!r}: {exc}") from None
            client = MaskingClient(
                session,
                self.node_id,
                identity=self._identity,
                identities=self._keys,
                carrier_authenticated=self.carrier_authenticated,
            )
            shape = [int(s) for s in np.shape(value.values)]
            advert = client.advertise(
                {
                    "shape": shape,
                    "precision": spec.precision,
                    "bound": spec.bound,
                    "n": encoded.ring.size,
                }
            )
            with self._lock:
                self._pending[(epoch, path)] = _Pending(client, encoded, encoded.ring.size)
            return Sealed(SCHEME, advert.to_bytes())

        with self._lock:  # an earlier epoch's unfinished sums are abandoned
            self._pending = {k: v for k, v in self._pending.items() if k[0] >= epoch}
        return _replace(result, change)

    def answer(self, envelope: Envelope) -> dict[str, Any]:
        """One round of the aggregator's request, for every field it names: the node's
        messages, or {"error": why} (nothing of this round is sent then)."""
        from flame.protocols.masking import Message, ProtocolViolation

        if envelope.sender != self.aggregator_id:  # before any session's state moves
            log.warning("refused a masking request from %r, not the aggregator", envelope.sender)
            return {"error": "masking requests are taken from the aggregator only"}
        body = envelope.body if isinstance(envelope.body, dict) else {}
        step, messages = body.get("round"), body.get("messages")
        if step not in ROUND_OF_STEP or not isinstance(messages, dict):
            return {"error": "malformed masking request"}
        out: dict[str, Sealed] = {}
        try:
            for path, sealed in sorted(messages.items()):
                if not isinstance(sealed, Sealed) or sealed.scheme != SCHEME:
                    return {"error": f"malformed masking request for {path!r}"}
                with self._lock:
                    pending = self._pending.get((envelope.epoch, path))
                if pending is None:
                    return {"error": f"no masked sum of {path!r} is open in epoch {envelope.epoch}"}
                client, sender = pending.client, envelope.sender  # verified by the transport
                if step == "keys":
                    reply = client.share_keys(sealed.data, length=pending.length, sender=sender)
                elif step == "ciphertexts":
                    reply = client.masked_input(sealed.data, pending.values, sender=sender)
                    pending.values = None  # masked and sent: the node keeps no copy
                elif step == "survivors":
                    u3 = Message.from_bytes(sealed.data).body.get("u3")
                    chosen = self.guard.check(envelope.epoch, path, u3)
                    reply = client.consistency(sealed.data, sender=sender)  # signed, not sent
                    self.guard.record(envelope.epoch, path, chosen)
                else:
                    reply = client.reveal(sealed.data, sender=sender)
                    with self._lock:
                        self._pending.pop((envelope.epoch, path), None)
                out[path] = Sealed(SCHEME, reply.to_bytes())
        except (ProtocolViolation, FlameError) as exc:
            log.warning(
                "refused the masked sum's %r round of epoch %d: %s", step, envelope.epoch, exc
            )
            return {"error": str(exc)[:500]}
        return {"messages": out}

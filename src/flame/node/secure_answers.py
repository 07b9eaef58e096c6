"""An analysis node's answers to the aggregator's secure-aggregation requests.

Threshold mode: the share holder (`flame.secure.threshold.ThresholdParty`) endorses and
decrypts. Single-key mode: `flame.secure.single_key.SingleKeyDecrypter` re-adds the signed
contributions and keeps the differencing guard. Either way, a request is answered with a
reply or an error, never by raising: a malformed request must not stop the node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flame.secure.decrypt import DECRYPTED
from flame.secure.endorse import ENDORSE, ENDORSED
from flame.secure.single_key import SingleKeyDecrypter

if TYPE_CHECKING:
    from flame.secure.keys import SecureKeys
    from flame.transport.base import Transport
    from flame.wire.envelope import Envelope

__all__ = ["SecureAnswers"]

log = logging.getLogger(__name__)


class SecureAnswers:
    """Answers DECRYPT and ENDORSE requests for one node (see the module)."""

    def __init__(
        self, keys: SecureKeys | None, transport: Transport, state: Callable[[], Any]
    ) -> None:
        self.keys = keys
        self.transport = transport
        self._state = state  # the node-local state (read when first needed)
        self._single: SingleKeyDecrypter | None = None

    def sent(self, epoch: int, body: Any, specs: dict[str, Any]) -> None:
        """This node sent `body` for `epoch`: what a single-key decryption must contain."""
        single = self._single_key()
        if single is not None:
            single.sent(epoch, body, specs)

    def answer(self, envelope: Envelope) -> None:
        keys = self.keys
        single = self._single_key()
        if envelope.category == ENDORSE:  # endorse a contribution set before decrypting
            if keys is not None and keys.share is not None:
                body = keys.party(self._state()).endorse(envelope)
            elif single is not None:
                body = single.endorse(envelope)
            else:
                body = {"error": "this node holds no key to endorse a set with"}
            self.transport.send(envelope.reply("message", body, category=ENDORSED))
            return
        if keys is not None and keys.share is not None:
            reply: dict[str, Any] = keys.party(self._state()).answer(envelope)
        elif single is None:
            reply = {"error": "this node has no private key to decrypt with"}
        else:
            reply = single.answer(envelope)
        if "error" in reply:
            log.warning(
                "refused the aggregator's decryption request of epoch %d: %s",
                envelope.epoch,
                str(reply["error"])[:300],
            )
        self.transport.send(envelope.reply("message", reply, category=DECRYPTED))

    def _single_key(self) -> SingleKeyDecrypter | None:
        keys = self.keys
        if keys is None or keys.private_key is None or keys.share is not None:
            return None
        if self._single is None:
            auth = self.transport.auth
            self._single = SingleKeyDecrypter(
                keys,
                self.transport.node_id,
                self.transport.analysis_id,
                None if auth is None else frozenset(auth.roster.ids("analysis")),
                self._state(),
            )
        return self._single

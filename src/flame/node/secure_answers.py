"""An analysis node's side of secure sums: its result sealed, the aggregator's requests answered.

Sealing: `flame.secure` fields encrypted (Paillier; a node without the private key computes
ciphertexts ahead) or masked (FLAME_SECURE__SCHEME=masking). Answers: threshold mode, the
share holder (`flame.secure.threshold.ThresholdParty`) endorses and decrypts; single-key
mode, `flame.secure.single_key.SingleKeyDecrypter` re-adds the signed contributions and
keeps the differencing guard; masking, `flame.secure.masking` answers its rounds. Either
way, a request is answered with a reply or an error, never by raising: a malformed request
must not stop the node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flame.secure.decrypt import DECRYPTED
from flame.secure.endorse import ENDORSE, ENDORSED
from flame.secure.keys import Precomputer
from flame.secure.masking import MASK, MASKED, MaskingNode
from flame.secure.sealing import seal
from flame.secure.single_key import SingleKeyDecrypter

if TYPE_CHECKING:
    from flame.secure.keys import SecureKeys
    from flame.transport.base import Transport
    from flame.wire.envelope import Envelope

__all__ = ["SecureAnswers"]

log = logging.getLogger(__name__)


class SecureAnswers:
    """Seals one node's results and answers the aggregator's DECRYPT, ENDORSE and MASK
    requests (see the module)."""

    def __init__(
        self,
        keys: SecureKeys | None,
        transport: Transport,
        state: Callable[[], Any],
        masking: MaskingNode | None = None,
    ) -> None:
        self.keys = keys
        self.transport = transport
        self._state = state  # the node-local state (read when first needed)
        self.masking = masking  # FLAME_SECURE__SCHEME=masking: flame.secure.masking
        self._single: SingleKeyDecrypter | None = None
        self._precomputer: Precomputer | None = None
        self._specs: dict[str, Any] = {}  # field -> the encoding this node sealed it with

    def start(self) -> None:
        """Before connecting: ciphertexts computed ahead (keys without a private key)."""
        if self.keys is not None and self.keys.private_key is None and self._precomputer is None:
            self._precomputer = Precomputer(self.keys)
            self._precomputer.fill(self.keys.precompute)

    def seal(self, result: Any, epoch: int, run: str | None = None) -> Any:
        """`result` with its `flame.secure` fields sealed for the aggregator."""
        self._specs = {}
        if self.keys is not None:
            self.keys.used_ciphertexts = 0
        origin = (self.transport.analysis_id, epoch, self.transport.node_id)
        if self.masking is not None:
            return self.masking.seal(result, epoch, run)
        body = seal(result, self.keys, self._specs, origin)
        self.sent(epoch, body, self._specs)
        return body

    def refill(self) -> None:
        """After a result left: precompute what it used, for the next epoch."""
        if self._precomputer is not None and self.keys is not None:
            self._precomputer.fill(self.keys.used_ciphertexts)  # for the next epoch

    def stop(self) -> None:
        if self._precomputer is not None:
            self._precomputer.stop()

    def sent(self, epoch: int, body: Any, specs: dict[str, Any]) -> None:
        """This node sent `body` for `epoch`: what a single-key decryption must contain."""
        single = self._single_key()
        if single is not None:
            single.sent(epoch, body, specs)

    def answer(self, envelope: Envelope) -> None:
        if envelope.category == MASK:  # a round of a masked secure sum
            error = {"error": "this node does not sum with masking (FLAME_SECURE__SCHEME)"}
            try:
                mask = self.masking.answer(envelope) if self.masking is not None else None
            except Exception as exc:  # a request no check foresaw: refused, the node goes on
                log.error(
                    "refused a masking request of epoch %d: unexpected %s",
                    envelope.epoch,
                    type(exc).__name__,  # its text may hold what the request carried
                )
                mask = {"error": f"the node could not handle the request ({type(exc).__name__})"}
            self.transport.send(envelope.reply("message", mask or error, category=MASKED))
            return
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

"""The aggregator's side of secure sums: add what it cannot read, have the nodes decrypt.

Single key: the nodes' signed contributions are checked and added; every contributor
endorses the set (`flame.secure.unanimous`), one node (the reporter) decrypts by re-adding
them, and at least min_contributors - 1 others confirm its plaintext before it is used.
Threshold mode: `flame.secure.threshold.ThresholdCollector`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from flame.errors import FlameError, RunFailed
from flame.secure.decrypt import DECRYPT, DECRYPTED
from flame.secure.marked import Results, _as_floats, _plain, sealed_fields, strip_sealed
from flame.secure.sealing import SCHEME, _spec_hint
from flame.wire.envelope import Envelope, Sealed

if TYPE_CHECKING:
    from flame.node.context import Context
    from flame.protocols.paillier import EncryptedVector
    from flame.secure.keys import SecureKeys
    from flame.secure.threshold import ThresholdCollector

__all__ = ["SecureSummer"]

log = logging.getLogger(__name__)


@dataclass
class SecureSummer:
    """Adds the sealed fields of an epoch's results and has the analysis nodes decrypt."""

    keys: SecureKeys | None
    timeout: float
    context: Context | None = None
    confirm_fraction: float | None = None
    _collector: ThresholdCollector | None = None
    _fixed: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __call__(self, results: dict[str, Any], epoch: int) -> Results:
        sealed = sealed_fields(results)
        if not sealed:
            return Results(results)
        if self.keys is None:
            raise RunFailed(
                "nodes sent encrypted values, but secure aggregation is not enabled on the "
                "aggregator (FLAME_SECURE__ENABLED=true and a public key)"
            )
        assert self.context is not None
        if self.keys.threshold is not None:
            return self._threshold(results, sealed, epoch)
        from flame.protocols.paillier import EncryptedVector

        sums: dict[str, Sealed] = {}
        contributors: dict[str, list[str]] = {}
        precision: dict[str, int] = {}
        signed = self._signed_fields(sealed, epoch)
        for path, by_node in sealed.items():
            vectors = []
            for node, item in sorted(by_node.items()):
                if signed:
                    continue  # added (and checked) by _signed_fields
                if item.scheme != SCHEME:
                    raise RunFailed(f"node {node!r} sent {path!r} sealed with {item.scheme!r}")
                try:
                    vectors.append(EncryptedVector.from_bytes(item.data, self.keys.public_key))
                except FlameError as exc:
                    raise RunFailed(
                        f"node {node!r} sent an invalid encrypted {path!r}: {exc}", node=node
                    ) from exc
            try:
                total = signed[path] if signed else EncryptedVector.sum(vectors)
            except FlameError as exc:
                raise RunFailed(
                    f"cannot add the encrypted {path!r}: {exc}{_spec_hint(exc)}"
                ) from exc
            sums[path] = Sealed(SCHEME, total.to_bytes())
            contributors[path] = sorted(by_node)
            precision[path] = total.layout.precision
        decrypted = self._decrypt(epoch, sums, contributors, sealed if signed else None)
        plain = {p: _plain(v, precision[p]) for p, v in decrypted.items()}
        return Results(strip_sealed(results), plain, contributors)

    def _threshold(
        self, results: dict[str, Any], sealed: dict[str, dict[str, Sealed]], epoch: int
    ) -> Results:
        """Threshold mode: the share holders check and decrypt; the aggregator combines."""
        from flame.protocols.paillier.encoding import _unpack
        from flame.secure.contributions import sum_contributions
        from flame.secure.threshold import ThresholdCollector

        assert self.keys is not None and self.keys.threshold is not None
        assert self.context is not None
        public = self.keys.threshold
        if self._collector is None:
            self._collector = ThresholdCollector(
                public,
                self.context,
                self.timeout,
                self.keys.allow_changing_contributors,
                DECRYPT,
                DECRYPTED,
                decrypters=self.keys.decrypters,
                verify=self.keys.verifier,
            )
        totals = {}
        for path, by_node in sealed.items():
            try:
                totals[path] = sum_contributions(
                    public, self.context.analysis_id, epoch, path, by_node, self.keys.verifier
                )
            except FlameError as exc:  # e.g. a contributor's proof of plaintext knowledge
                node = getattr(exc, "node", None)  # fails: named before anyone is asked
                raise RunFailed(
                    f"cannot add the encrypted {path!r}: {exc}", epoch=epoch, node=node
                ) from exc
        packed = self._collector.decrypt(epoch, sealed, totals)
        plain: dict[str, Any] = {}
        for path, total in totals.items():
            try:
                sums = _unpack(packed[path], total.layout, total.size, total.contributors)
            except FlameError as exc:
                raise RunFailed(f"the decrypted sum of {path!r}: {exc}", epoch=epoch) from exc
            floats = _as_floats(sums) / float(2**total.layout.precision)
            plain[path] = _plain(floats.reshape(total.shape), total.layout.precision)
        contributors = {path: sorted(by_node) for path, by_node in sealed.items()}
        return Results(strip_sealed(results), plain, contributors)

    def _signed_fields(
        self, sealed: dict[str, dict[str, Sealed]], epoch: int
    ) -> dict[str, EncryptedVector]:
        """Single key, signed contributions (`flame.secure.single_key`): each checked and
        added; {} when the nodes sent unsigned ones (an unsigned run). The differencing guard
        is checked here too, so an honest aggregator stops with the reason the nodes would
        give."""
        from flame.secure.single_key import SIGNED, add_signed
        from flame.secure.threshold import _own_first, differencing_problem

        assert self.keys is not None and self.context is not None
        schemes = {item.scheme for by_node in sealed.values() for item in by_node.values()}
        if SIGNED not in schemes:
            if self.keys.verifier is not None:
                raise RunFailed(
                    "nodes sent unsigned encrypted values in a signed run (every node of a "
                    "run must run the same flame version)",
                    epoch=epoch,
                )
            return {}
        totals: dict[str, EncryptedVector] = {}
        for path, by_node in sealed.items():
            who = tuple(sorted(by_node))
            for first, fixed in _own_first(self._fixed, path):
                problem = differencing_problem(first, fixed, who)
                if problem is not None and not self.keys.allow_changing_contributors:
                    where = "" if first == path else f" ({path!r})"
                    raise RunFailed(f"epoch {epoch}{where}: {problem}", epoch=epoch)
            try:
                totals[path] = add_signed(
                    self.keys.public_key,
                    self.context.analysis_id,
                    epoch,
                    path,
                    by_node,
                    self.keys.verifier,
                )
            except FlameError as exc:
                node = getattr(exc, "node", None)
                if node is not None:
                    raise RunFailed(
                        f"node {node!r} sent an invalid encrypted {path!r}: {exc}",
                        node=node,
                        epoch=epoch,
                    ) from exc
                raise RunFailed(
                    f"cannot add the encrypted {path!r}: {exc}{_spec_hint(exc)}", epoch=epoch
                ) from exc
        for path, by_node in sealed.items():
            self._fixed.setdefault(path, tuple(sorted(by_node)))
        return totals

    def _decrypt(
        self,
        epoch: int,
        sums: dict[str, Sealed],
        contributors: dict[str, list[str]],
        signed: dict[str, dict[str, Sealed]] | None = None,
    ) -> dict[str, np.ndarray]:
        """The reporter decrypts, the others confirm. Signed contributions (`signed`) are sent
        instead of the sums: every decrypter re-adds them itself."""
        nodes = sorted({n for who in contributors.values() for n in who})
        reporter, confirmers = nodes[0], nodes[1:]
        request: dict[str, Any] = {"contributors": contributors, "reporter": reporter}
        if signed is None:
            request["sums"] = sums
        else:
            request["contributions"] = signed
            request["endorsements"] = self._endorsements(epoch, nodes, signed, contributors)
        report = self._ask(epoch, [reporter], request)[reporter]
        plain = report.get("sums")
        if not isinstance(plain, dict) or set(plain) != set(sums):
            raise RunFailed(
                f"node {reporter!r} reported a malformed decrypted sum", node=reporter, epoch=epoch
            )
        plain = {p: np.asarray(v, dtype=np.float64) for p, v in plain.items()}
        if confirmers:
            fraction = self.confirm_fraction or min(1.0, 3.0 / len(confirmers))
            # the chance a lie in one ciphertext escapes every confirmer, all of them answering
            target = (1.0 - min(1.0, fraction)) ** len(confirmers)
            confirm = {**request, "reported": plain, "fraction": fraction}
            replies = self._confirmations(epoch, confirmers, confirm)
            self._enough_confirmations(epoch, reporter, confirmers, replies)
            escape = (1.0 - min(1.0, fraction)) ** len(replies)
            if escape > target * (1 + 1e-9):
                # Too few answered (held back?): the ones that did check more, so the chance
                # of a lie escaping stays the configured one (red team B3).
                wider = 1.0 if target <= 0 else min(1.0, 1.0 - target ** (1.0 / len(replies)))
                log.warning(
                    "epoch %d: %d of %d confirmers answered; asking them to check %.0f%% of "
                    "the ciphertexts",
                    epoch,
                    len(replies),
                    len(confirmers),
                    100 * wider,
                )
                again = self._confirmations(epoch, list(replies), {**confirm, "fraction": wider})
                escape = (1.0 - wider) ** len(again)
                if escape > target * (1 + 1e-9):
                    missing = sorted(set(confirmers) - set(again))
                    raise RunFailed(
                        f"epoch {epoch}: the secure sum reported by {reporter!r} was confirmed "
                        f"over too little of it ({len(again)} of {len(confirmers)} confirmers "
                        f"answered the wider check); the unconfirmed sum is not used (no "
                        f"confirmation from {', '.join(missing)})",
                        node=missing[0] if missing else None,
                        epoch=epoch,
                    )
        return plain

    def _confirmations(
        self, epoch: int, confirmers: list[str], body: dict[str, Any]
    ) -> dict[str, dict[str, Any]]:
        """The confirmers' replies (those that answered in time), each checked for form."""
        replies = self._ask(epoch, confirmers, body, required=False)
        for node, reply in replies.items():
            if not isinstance(reply.get("confirmed"), int):
                raise RunFailed(
                    f"node {node!r} sent a malformed confirmation", node=node, epoch=epoch
                )
        return replies

    def _enough_confirmations(
        self, epoch: int, reporter: str, confirmers: list[str], replies: dict[str, Any]
    ) -> None:
        """The reporter's sum is released only when at least min_contributors - 1 (and at
        least one) other contributors confirmed it: a lying reporter whose confirmers are
        held back (e.g. by the broker's operator) must not end the run with its sum."""
        assert self.keys is not None
        needed = min(len(confirmers), max(1, self.keys.min_contributors - 1))
        if len(replies) >= needed:
            return
        missing = [node for node in confirmers if node not in replies]
        raise RunFailed(
            f"epoch {epoch}: {len(replies)} of {len(confirmers)} other contributors confirmed "
            f"the secure sum reported by {reporter!r} within {self.timeout:g} s, at least "
            f"{needed} needed (FLAME_SECURE__MIN_CONTRIBUTORS - 1); the unconfirmed sum is not "
            f"used (no confirmation from {', '.join(missing)})",
            node=missing[0],
            epoch=epoch,
        )

    def _endorsements(
        self,
        epoch: int,
        nodes: list[str],
        signed: dict[str, dict[str, Sealed]],
        contributors: dict[str, list[str]],
    ) -> dict[str, dict[str, Any]]:
        """Single key, signed: every contributor endorses the set before anyone decrypts it
        (`flame.secure.unanimous`); a refusal or a missing endorsement fails the epoch."""
        import hashlib

        digests = {
            path: {node: hashlib.sha256(bytes(item.data)).hexdigest() for node, item in by.items()}
            for path, by in signed.items()
        }
        replies = self._ask(epoch, nodes, {"digests": digests, "contributors": contributors})
        endorsements: dict[str, dict[str, Any]] = {path: {} for path in signed}
        for node, reply in replies.items():
            got = reply.get("endorsements")
            if not isinstance(got, dict):
                raise RunFailed(f"node {node!r} sent a malformed endorsement", node=node)
            for path in signed:
                if node in contributors[path]:
                    endorsements[path][node] = got.get(path)
        return endorsements

    def _ask(
        self, epoch: int, nodes: list[str], body: dict[str, Any], *, required: bool = True
    ) -> dict[str, dict[str, Any]]:
        """Send a decryption (or, with "digests", an endorsement) request to `nodes` and
        collect their replies."""
        from flame.secure.endorse import ENDORSE, ENDORSED

        assert self.context is not None
        transport = self.context._mailbox.transport
        what = next(key for key in ("sums", "contributions", "digests") if key in body)
        asking, answer = (ENDORSE, ENDORSED) if what == "digests" else (DECRYPT, DECRYPTED)
        for node in nodes:
            asked = {p: s for p, s in body[what].items() if node in body["contributors"][p]}
            transport.send(
                Envelope(
                    self.context.analysis_id,
                    self.context.node_id,
                    node,
                    "message",
                    epoch,
                    {**body, what: asked},
                    asking,
                )
            )
        received = self.context.receive(answer, senders=nodes, timeout=self.timeout)
        replies: dict[str, dict[str, Any]] = {}
        for node, reply in received.messages.items():
            if not isinstance(reply, dict):
                raise RunFailed(f"node {node!r} sent a malformed decryption reply", node=node)
            if "error" in reply:
                role = "confirm" if "reported" in body else "decrypt"
                role = "endorse" if what == "digests" else role
                raise RunFailed(
                    f"node {node!r} refused to {role} the secure sum of epoch {epoch}: "
                    f"{str(reply['error'])[:300]}",
                    node=node,
                    epoch=epoch,
                )
            replies[node] = reply
        if received.missing:
            if required:
                raise RunFailed(
                    f"node {received.missing[0]!r} did not decrypt the sum of epoch {epoch} "
                    f"within {self.timeout:g} s",
                    node=received.missing[0],
                    epoch=epoch,
                )
            log.warning(
                "epoch %d: no confirmation of the secure sum from %s",
                epoch,
                ", ".join(received.missing),
            )
        return replies

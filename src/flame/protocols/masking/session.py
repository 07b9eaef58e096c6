"""What every party of one masked sum agrees on before it starts, and the mask arithmetic
that both the nodes (adding masks) and the server (removing them) use."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from flame.protocols.masking.encoding import ring_bits
from flame.protocols.masking.errors import MaskingError
from flame.protocols.masking.graph import SPARSE_FROM, MaskGraph, degree_for, graph_seed
from flame.protocols.masking.messages import Binding
from flame.protocols.masking.prg import RING_DTYPES, add_masks, derive_key
from flame.protocols.paillier.encoding import SecureSumSpec

__all__ = ["Session", "add_mask", "self_mask_key"]

Ring = npt.NDArray[np.unsignedinteger]


@dataclass(frozen=True)
class Session:
    """One secure sum: its binding, the nodes that may take part (sorted; a node's Shamir
    index is its position + 1), the threshold t and the fixed-point spec.

    `spec` is narrowed to the n participants (max_nodes = n): every party of the sum
    derives the same ring, the narrowest that holds n bounded values.

    t must be a strict majority of the participants. Every honest node signs at most one
    survivor set U3 and a node reveals shares only under a U3 that t nodes signed; two
    different such sets share at least 2t - n signers, so while fewer than 2t - n nodes
    collude with the server (c < 2t - n; a strict majority makes this hold for c = 0) all
    honest nodes act on the same U3. Every round needs at least t nodes left (fewer: the
    sum is abandoned). On the complete graph t is also the Shamir threshold; on a sparse
    graph (`graph`) a node's secrets are shared among its neighbours, t_k of k + 1
    (`shares_needed`), and t still bounds U1..U4 and the consistency signatures."""

    binding: Binding
    participants: tuple[str, ...]
    threshold: int
    spec: SecureSumSpec
    server: str = "aggregator"
    degree: int | None = None
    """Neighbours per node: None picks the graph (`graph.SPARSE_FROM`); n - 1 or more is the
    complete graph; fewer, a sparse graph of that degree (tests, benchmarks)."""
    share_threshold: int | None = None
    """t_k of a sparse graph given a `degree` (default: floor(2(k+1)/3) + 1 of k + 1)."""
    graph: MaskGraph = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(set(self.participants)))
        if len(ordered) != len(self.participants):
            raise MaskingError("masking session: participants are listed twice")
        object.__setattr__(self, "participants", ordered)
        n = len(ordered)
        if n > self.spec.max_nodes:
            raise MaskingError(
                f"{n} participants but the spec leaves room for {self.spec.max_nodes}"
            )
        if not 2 * self.threshold > n or self.threshold > n:
            raise MaskingError(
                f"masking threshold {self.threshold} of {n} nodes: it must be a strict "
                f"majority (at least {n // 2 + 1}) and at most {n}"
            )
        if self.server in ordered:
            raise MaskingError("the server cannot also be a participant of its sum")
        # the ring only has to hold this sum's n contributions, not max_nodes': often half
        # the width (32 bits), so half the keystream, the additions and the bytes sent
        object.__setattr__(self, "spec", replace(self.spec, max_nodes=n))
        ring_bits(self.spec)
        degree, share_threshold = self.degree, self.share_threshold
        if degree is None and n >= SPARSE_FROM and (auto := degree_for(n)) is not None:
            degree, share_threshold = auto
        if degree is not None and degree >= n - 1:
            degree = None
        if degree is None:
            share_threshold = self.threshold
        elif share_threshold is None:
            share_threshold = min(degree + 1, 2 * (degree + 1) // 3 + 1)
        if not 1 <= share_threshold <= (n if degree is None else degree + 1):
            raise MaskingError(f"share threshold {share_threshold} is out of range")
        seed = graph_seed(self.binding.context(), ordered)
        object.__setattr__(self, "graph", MaskGraph(ordered, degree, seed))
        object.__setattr__(self, "share_threshold", share_threshold)

    @property
    def bits(self) -> int:
        return ring_bits(self.spec)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return RING_DTYPES[self.bits]

    def index(self, node: str) -> int:
        try:
            return self.participants.index(node) + 1
        except ValueError:
            raise MaskingError(f"{node!r} is not a participant of this sum") from None

    @property
    def shares_needed(self) -> int:
        """Shares that rebuild one node's secret: t (complete graph) or t_k (sparse)."""
        assert self.share_threshold is not None
        return self.share_threshold

    @property
    def peers_needed(self) -> int:
        """Peers a survivor must have masked with, and still have in the signed U3, before
        its self-mask share is revealed: enough that one of them is honest, so that pair's
        mask stays on its input. Sparse: t_k (no node has t_k corrupt neighbours, see
        `graph`). Complete: t - 1 (while c < 2t - n <= t - 1 nodes collude, t - 1 peers
        hold an honest one; with t = n the sum over everyone else is already known)."""
        return self.shares_needed if self.graph.sparse else self.threshold - 1

    def neighbours(self, node: str) -> frozenset[str]:
        return self.graph.neighbours(node)

    def holders(self, node: str) -> frozenset[str]:
        """Who holds shares of `node`'s secrets (its neighbours and itself)."""
        return self.graph.holders(node)

    def require(self, nodes: Iterable[str], what: str, *, holders: bool = False) -> None:
        """At least t nodes in `nodes` (with `holders`: t_k, for a node's share holders on a
        sparse graph), or the sum is abandoned (MaskingError)."""
        count = len(set(nodes))
        needed = self.shares_needed if holders else self.threshold
        if count < needed:
            need = "the shares need" if holders else "the masking threshold needs"
            raise MaskingError(
                f"{what}: {count} nodes, {need} {needed}; "
                "the sum is abandoned (nothing was revealed)"
            )


def self_mask_key(seed: bytes, context: bytes, node: str) -> bytes:
    return derive_key(seed, b"flame-masking-self-v1", context + b"\0" + node.encode())


def add_mask(acc: Ring, key: bytes, bits: int, sign: int) -> None:
    """acc += sign * PRG(key) mod 2**bits, in place (many masks: `prg.add_masks`)."""
    add_masks(acc, [(key, sign)], bits)

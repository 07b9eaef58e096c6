"""Who masks with whom: the complete graph, or from SPARSE_FROM nodes on a sparse random
graph of degree k = O(log n) (SecAgg+, Bell et al., CCS 2020).

Sparse: the participants are placed on a ring in an order fixed by SHA-256 over the session
binding (analysis, epoch, field) and the sorted participant list, and each node is joined to
the k/2 nearest on either side (a Harary graph H(n, k) under a pseudo-random permutation).
Every party computes the graph from values fixed before any key exists, so the server
cannot pick a victim's neighbours after seeing keys: it can only take the graph the binding
gives. A node's secrets are Shamir-shared among its neighbours and itself, t_k of k + 1.

`degree_for(n)` is the smallest even k (and its t_k) for which, over the random graph,
  * privacy: no node has t_k corrupt neighbours, with up to CORRUPT * n corrupt nodes,
    except with probability <= 2**-PRIVACY_BITS (a union bound over the n nodes of the
    exact hypergeometric tail);
  * completion: every node keeps t_k of its k neighbours when DROPOUT * n nodes drop at
    random, except with probability <= 2**-ABORT_BITS (else the sum is abandoned, never
    wrong).
A node reveals the self-mask share of a survivor only when at least t_k of the neighbours
that survivor signed it masked with survived too (`client`): one of them is then honest, so
their pairwise mask stays on the survivor's input, whatever U2 the server told whom and
whomever it declares dropped.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from flame.protocols.masking.errors import MaskingError

__all__ = [
    "ABORT_BITS",
    "CORRUPT",
    "DROPOUT",
    "PRIVACY_BITS",
    "SPARSE_FROM",
    "MaskGraph",
    "degree_for",
    "graph_seed",
]

SPARSE_FROM = 100
"""From this many participants the sparse graph is used: at 100 nodes k = 42 (t_k = 32; 42 %
of the other nodes), at 200 k = 64, at 1,000 k = 102, at 10,000 k = 126. Below 100 the
graph would keep most edges (k = 22 of 49 at 50 nodes) for little saving, and the complete
graph's stronger guarantee (the server learns only the total) is kept."""
CORRUPT = 1 / 3
"""Fraction of corrupt nodes the sparse graph tolerates (the complete graph's default
threshold, floor(2n/3) + 1, tolerates the same)."""
DROPOUT = 0.1
"""Fraction of nodes that may drop at random with the sum still completing (w.h.p.)."""
PRIVACY_BITS = 40
ABORT_BITS = 20


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _tail(population: int, marked: int, draws: int, at_least: int) -> float:
    """P[X >= at_least] for X hypergeometric: `draws` of `population`, `marked` marked."""
    low = max(at_least, 0, draws - (population - marked))
    high = min(marked, draws)
    if low > high:
        return 0.0
    total = _log_comb(population, draws)
    return sum(
        math.exp(_log_comb(marked, i) + _log_comb(population - marked, draws - i) - total)
        for i in range(low, high + 1)
    )


@lru_cache(maxsize=256)
def degree_for(n: int) -> tuple[int, int] | None:
    """(k, t_k) for `n` participants, or None when no k below n - 1 meets the bounds."""
    corrupt, dropped = math.floor(CORRUPT * n), math.floor(DROPOUT * n)
    privacy, abort = 2.0**-PRIVACY_BITS / n, 2.0**-ABORT_BITS / n
    for k in range(4, n - 1, 2):
        t = next(
            (t for t in range(1, k + 1) if _tail(n - 1, corrupt, k, t) <= privacy),
            None,
        )
        if t is not None and _tail(n - 1, dropped, k, k - t + 1) <= abort:
            return k, t
    return None


def graph_seed(context: bytes, participants: Iterable[str]) -> bytes:
    """The bytes that fix the ring order: the session binding and the participant list."""
    members = "\0".join(sorted(participants)).encode()
    return hashlib.sha256(b"flame-masking-graph-v1\0" + context + b"\0" + members).digest()


@dataclass(frozen=True)
class MaskGraph:
    """The masking graph of one session: `degree` None is the complete graph."""

    participants: tuple[str, ...]
    degree: int | None
    seed: bytes = b""
    _neighbours: dict[str, frozenset[str]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.participants)
        everyone = frozenset(self.participants)
        if self.degree is None:
            for v in self.participants:
                self._neighbours[v] = everyone - {v}
            return
        k = self.degree
        if k < 2 or k % 2 or k >= n:
            raise MaskingError(f"a sparse masking graph needs an even degree in 2..{n - 1}")
        ring = sorted(
            self.participants, key=lambda v: hashlib.sha256(self.seed + v.encode()).digest()
        )
        for i, v in enumerate(ring):
            near = {ring[(i + d) % n] for d in range(1, k // 2 + 1)}
            near |= {ring[(i - d) % n] for d in range(1, k // 2 + 1)}
            self._neighbours[v] = frozenset(near)

    @property
    def sparse(self) -> bool:
        return self.degree is not None

    def neighbours(self, node: str) -> frozenset[str]:
        try:
            return self._neighbours[node]
        except KeyError:
            raise MaskingError(f"{node!r} is not a participant of this sum") from None

    def holders(self, node: str) -> frozenset[str]:
        """Who holds shares of `node`'s secrets: its neighbours and itself."""
        return self.neighbours(node) | {node}

"""What every party of one masked sum agrees on before it starts, and the mask arithmetic
that both the nodes (adding masks) and the server (removing them) use."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from flame.protocols.masking.encoding import ring_bits
from flame.protocols.masking.errors import MaskingError
from flame.protocols.masking.messages import Binding
from flame.protocols.masking.prg import RING_DTYPES, add_masks, derive_key
from flame.protocols.paillier.encoding import SecureSumSpec

__all__ = ["Session", "add_mask", "self_mask_key"]

Ring = npt.NDArray[np.unsignedinteger]


@dataclass(frozen=True)
class Session:
    """One secure sum: its binding, the nodes that may take part (sorted; a node's Shamir
    index is its position + 1), the threshold t and the fixed-point spec.

    t must be a strict majority of the participants: the server then cannot split the
    nodes into two groups that each reconstruct a different half of one node's secrets,
    and every round needs at least t nodes left (fewer: the sum is abandoned)."""

    binding: Binding
    participants: tuple[str, ...]
    threshold: int
    spec: SecureSumSpec
    server: str = "aggregator"

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
        ring_bits(self.spec)

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

    def require(self, nodes: Iterable[str], what: str) -> None:
        """At least t nodes in `nodes`, or the sum is abandoned (MaskingError)."""
        count = len(set(nodes))
        if count < self.threshold:
            raise MaskingError(
                f"{what}: {count} nodes, the masking threshold needs {self.threshold}; "
                "the sum is abandoned (nothing was revealed)"
            )


def self_mask_key(seed: bytes, context: bytes, node: str) -> bytes:
    return derive_key(seed, b"flame-masking-self-v1", context + b"\0" + node.encode())


def add_mask(acc: Ring, key: bytes, bits: int, sign: int) -> None:
    """acc += sign * PRG(key) mod 2**bits, in place (many masks: `prg.add_masks`)."""
    add_masks(acc, [(key, sign)], bits)

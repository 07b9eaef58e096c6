"""Fixed-point values as elements of Z_{2^k}: Paillier's encoding and bounds, a ring instead
of slots.

A node's values are encoded as `encode_fixed_point` does (refusing NaN, infinities and any
value past the field's bound before anything is masked: never clipped), then read mod 2**k;
`RingInput` keeps the result, so a node checks and encodes its values once.
The ring is wide enough for the sum of `max_nodes` values of either sign, so the unmasked sum
decodes exactly; a sum outside that range cannot come from honest nodes and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from flame.protocols.masking.errors import MaskingError
from flame.protocols.masking.prg import RING_DTYPES
from flame.protocols.paillier.encoding import SecureSumSpec, _as_float_array, encode_fixed_point
from flame.protocols.paillier.errors import AggregationOverflowError

__all__ = ["RingInput", "decode_sum", "encode_to_ring", "ring_bits"]


def ring_bits(spec: SecureSumSpec) -> int:
    """The narrowest ring (32 or 64 bits) holding any sum of max_nodes bounded values."""
    span = 2 * spec.max_nodes * spec.max_abs_encoded
    for bits in sorted(RING_DTYPES):
        if span < 1 << bits:
            return bits
    raise MaskingError(
        "masking sums need 2 * max_nodes * bound * 2**precision below 2**64; "
        "lower the precision, the bound or max_nodes"
    )


def encode_to_ring(
    values: object, spec: SecureSumSpec, *, field: str
) -> npt.NDArray[np.unsignedinteger]:
    """The flat fixed-point encoding of `values` mod 2**ring_bits(spec) (two's complement):
    round(values * 2**precision), exactly as `encode_fixed_point`, in a few passes over one
    buffer. Any NaN, infinity or value past the bound: `encode_fixed_point`'s refusal, which
    names the field and the first bad index."""
    bits = ring_bits(spec)
    flat = _as_float_array(values, field).reshape(-1)
    work = np.abs(flat)
    # NaN compares False: one test refuses NaN, infinities and values past the bound alike
    if not bool(np.less_equal(work, float(spec.bound)).all()):
        encode_fixed_point(values, spec, field=field)  # raises, naming the first bad value
        raise MaskingError(f"{field}: a value is outside the bound")  # pragma: no cover
    np.multiply(flat, spec.scale, out=work)
    np.rint(work, out=work)
    encoded = work.astype(np.int64)
    if bits == 64:
        return encoded.view(np.uint64)
    return encoded.astype(RING_DTYPES[bits])


@dataclass(frozen=True)
class RingInput:
    """A node's input, checked against its bound and encoded for `spec` (`encode_to_ring`)."""

    ring: npt.NDArray[np.unsignedinteger]
    spec: SecureSumSpec

    @classmethod
    def encode(cls, values: object, spec: SecureSumSpec, *, field: str) -> RingInput:
        return cls(encode_to_ring(values, spec, field=field), spec)


def decode_sum(
    total: npt.NDArray[np.unsignedinteger], spec: SecureSumSpec, contributors: int
) -> npt.NDArray[np.int64]:
    """The exact signed fixed-point sum of `contributors` values from their sum mod 2**k."""
    bits = ring_bits(spec)
    ring = total.astype(RING_DTYPES[bits])
    signed: npt.NDArray[np.int64] = (
        ring.view(np.int32).astype(np.int64) if bits == 32 else ring.view(np.int64).copy()
    )
    limit = contributors * spec.max_abs_encoded
    over = np.abs(signed) > limit
    if over.any():
        raise AggregationOverflowError(
            f"{int(over.sum())} values of the unmasked sum lie outside what {contributors} "
            "bounded contributions can produce; a node sent values past its bound or the "
            "masks did not cancel. Refusing the sum"
        )
    return signed

"""Fixed-point encoding and slot packing: many bounded values in one plaintext.

Each slot has room for the sum over all nodes, so slots never carry into each other;
the layout travels with every ciphertext vector and is re-derived on receipt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from flame.protocols.paillier.errors import (
    AggregationOverflowError,
    SecureAggregationError,
    ValueOutOfBoundsError,
)

if TYPE_CHECKING:  # the masking scheme reuses this encoding without phe or gmpy2
    from phe.paillier import PaillierPublicKey

    from flame.protocols.paillier._math import Mpz

__all__ = ["SecureSumSpec", "SlotLayout", "encode_fixed_point"]

_MAX_PRECISION = 60
_MAX_ABS_ENCODED = 1 << 62
_MAX_NODES = 1 << 24
_MAX_NDIM = 32


@dataclass(frozen=True)
class SecureSumSpec:
    """What is summed and how precisely: shared by every node of an analysis.

    precision: fractional bits; a value is stored as round(value * 2**precision), so each
        value is off by at most 2**-(precision + 1) and a sum of k values by
        k * 2**-(precision + 1) (plus float64 rounding of the result).
    bound: the largest |value| a node may send; larger values are refused, never clipped.
    max_nodes: the most contributions one sum may hold; sets the headroom in every slot.

    Smaller bound, precision and max_nodes mean narrower slots: more values per ciphertext
    and less traffic. For 32-bit values (precision=16, bound=32768) and 100 nodes a slot is
    5 bytes, 51 slots per 2048-bit plaintext.
    """

    precision: int
    bound: float
    max_nodes: int

    def __post_init__(self) -> None:
        if not isinstance(self.precision, int) or isinstance(self.precision, bool):
            raise SecureAggregationError("SecureSumSpec.precision must be an int")
        if not 0 <= self.precision <= _MAX_PRECISION:
            raise SecureAggregationError(
                f"SecureSumSpec.precision must be between 0 and {_MAX_PRECISION} bits"
            )
        if isinstance(self.bound, bool) or not isinstance(self.bound, (int, float)):
            raise SecureAggregationError("SecureSumSpec.bound must be a number")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise SecureAggregationError("SecureSumSpec.bound must be finite and positive")
        if not isinstance(self.max_nodes, int) or isinstance(self.max_nodes, bool):
            raise SecureAggregationError("SecureSumSpec.max_nodes must be an int")
        if not 1 <= self.max_nodes <= _MAX_NODES:
            raise SecureAggregationError(
                f"SecureSumSpec.max_nodes must be between 1 and {_MAX_NODES}"
            )
        if math.ldexp(float(self.bound), self.precision) >= _MAX_ABS_ENCODED:
            raise SecureAggregationError(
                "SecureSumSpec: bound * 2**precision must stay below 2**62; "
                "lower the precision or the bound"
            )

    def with_overrides(
        self, *, bound: float | None = None, precision: int | None = None
    ) -> SecureSumSpec:
        """This spec with one field's own bound and/or precision (``flame.secure(x,
        bound=..., precision=...)``); max_nodes stays shared. The slot layout, and so the
        packing and wire size, follow from the result, field by field."""
        return SecureSumSpec(
            self.precision if precision is None else precision,
            self.bound if bound is None else bound,
            self.max_nodes,
        )

    @property
    def scale(self) -> float:
        """2**precision: the factor between a value and its integer encoding."""
        return math.ldexp(1.0, self.precision)

    @property
    def max_abs_encoded(self) -> int:
        """The largest |encoded value| one node can send: ceil(bound * 2**precision)."""
        return max(1, math.ceil(math.ldexp(float(self.bound), self.precision)))

    def max_error(self, contributors: int) -> float:
        """Worst absolute error of a decrypted sum of `contributors` values (before float64
        rounding of the result, which adds at most |result| * 2**-53)."""
        return contributors * math.ldexp(1.0, -(self.precision + 1))

    def layout(self, public_key: PaillierPublicKey) -> SlotLayout:
        """How values of this spec are packed under this key."""
        return SlotLayout.build(
            self.precision, self.max_abs_encoded, self.max_nodes, int(public_key.n).bit_length()
        )


@dataclass(frozen=True)
class SlotLayout:
    """Packing of one ciphertext vector: travels in the wire header and is re-derived and
    compared on receipt, so a sender cannot make slots overlap.

    Each slot holds sum(encoded + max_abs) over the contributors: at most
    max_nodes * 2 * max_abs, which fits in slot_bytes, so no slot can carry into the next.
    """

    precision: int
    max_abs: int
    max_nodes: int
    slot_bytes: int
    slots_per_ciphertext: int

    @classmethod
    def build(cls, precision: int, max_abs: int, max_nodes: int, modulus_bits: int) -> SlotLayout:
        slot_bits = (max_nodes * 2 * max_abs).bit_length()
        slot_bytes = (slot_bits + 7) // 8
        slots = (modulus_bits - 1) // (8 * slot_bytes)
        if slots < 1:
            raise SecureAggregationError("the key is too small for this SecureSumSpec")
        return cls(precision, max_abs, max_nodes, slot_bytes, slots)

    def ciphertexts_for(self, n_values: int) -> int:
        return -(-n_values // self.slots_per_ciphertext)


def _index_text(field: str, flat_index: int, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    if not shape:
        return field, ()
    index = tuple(int(i) for i in np.unravel_index(flat_index, shape))
    return f"{field}[{', '.join(map(str, index))}]", index


def _as_float_array(values: object, field: str) -> npt.NDArray[np.float64]:
    arr = np.asarray(values)
    if arr.dtype.kind not in "biufO":
        raise SecureAggregationError(f"{field}: expected numbers, got dtype {arr.dtype}")
    try:
        return arr.astype(np.float64, copy=False)
    except (TypeError, ValueError, OverflowError):
        raise SecureAggregationError(f"{field}: expected real numbers") from None


def encode_fixed_point(
    values: object, spec: SecureSumSpec, *, field: str = "value"
) -> npt.NDArray[np.int64]:
    """round(values * 2**precision) as int64, same shape; refuses out-of-bound input.

    Checks every value before anything is encrypted, and names the field and index of the
    first bad one; the value itself is not in the message, because it is a node's data.
    """
    arr = _as_float_array(values, field)
    flat = arr.reshape(-1)
    shape = tuple(int(s) for s in arr.shape)
    bad = ~np.isfinite(flat)
    if bad.any():
        i = int(np.argmax(bad))
        where, index = _index_text(field, i, shape)
        kind = "NaN" if math.isnan(float(flat[i])) else "infinite"
        more = int(bad.sum()) - 1
        tail = f" ({more} more non-finite values)" if more else ""
        raise ValueOutOfBoundsError(
            f"{where} is {kind}; nothing was encrypted{tail}", field=field, index=index
        )
    over = np.abs(flat) > float(spec.bound)
    if over.any():
        i = int(np.argmax(over))
        where, index = _index_text(field, i, shape)
        more = int(over.sum()) - 1
        tail = f" ({more} more values beyond the bound)" if more else ""
        raise ValueOutOfBoundsError(
            f"{where} is outside the declared bound +-{spec.bound}; nothing was encrypted{tail}",
            field=field,
            index=index,
        )
    return np.rint(flat * spec.scale).astype(np.int64).reshape(arr.shape)


def _pack(biased: npt.NDArray[np.int64], layout: SlotLayout) -> list[int]:
    """Biased slot values (each in [0, 2*max_abs]) -> one big-endian integer per ciphertext."""
    slots, width = layout.slots_per_ciphertext, layout.slot_bytes
    n_ct = layout.ciphertexts_for(biased.size)
    padded = np.zeros(n_ct * slots, dtype=">u8")
    padded[: biased.size] = biased
    raw = padded.view(np.uint8).reshape(-1, 8)
    if width <= 8:
        raw = raw[:, 8 - width :]
    else:
        raw = np.concatenate([np.zeros((raw.shape[0], width - 8), np.uint8), raw], axis=1)
    buf = memoryview(np.ascontiguousarray(raw).tobytes())
    row = slots * width
    return [int.from_bytes(buf[i * row : (i + 1) * row], "big") for i in range(n_ct)]


def _unpack(
    plaintexts: Sequence[Mpz], layout: SlotLayout, n_values: int, contributors: int
) -> npt.NDArray[Any]:
    """Packed sums -> exact signed fixed-point sums (int64, or Python ints when wider).

    Every slot must lie in [0, contributors * 2 * max_abs] and padding slots must be 0;
    anything else cannot come from honest contributions and is refused.
    """
    slots, width = layout.slots_per_ciphertext, layout.slot_bytes
    row = slots * width
    limit = 1 << (8 * row)
    for i, m in enumerate(plaintexts):
        if m >= limit:
            raise AggregationOverflowError(
                f"ciphertext {i}: plaintext is wider than its {slots} slots; "
                "the sum overflowed or was tampered with"
            )
    buf = b"".join(int(m).to_bytes(row, "big") for m in plaintexts)
    raw = np.frombuffer(buf, dtype=np.uint8).reshape(-1, width)
    max_slot = contributors * 2 * layout.max_abs
    offset = contributors * layout.max_abs
    sums: npt.NDArray[Any]
    if width <= 8:
        wide = np.zeros((raw.shape[0], 8), dtype=np.uint8)
        wide[:, 8 - width :] = raw
        sums = wide.view(">u8").reshape(-1).astype(np.uint64)
        bad = sums[:n_values] > np.uint64(max_slot)
        padding_bad = sums[n_values:] != 0
    else:
        sums = np.array([int.from_bytes(r.tobytes(), "big") for r in raw], dtype=object)
        bad = np.array([s > max_slot for s in sums[:n_values]], dtype=bool)
        padding_bad = np.array([s != 0 for s in sums[n_values:]], dtype=bool)
    if bad.any():
        i = int(np.argmax(bad))
        raise AggregationOverflowError(
            f"slot {i} of the decrypted sum is outside the range {contributors} honest "
            f"contributions can produce ({int(bad.sum())} slots in all); refusing the sum"
        )
    if padding_bad.any():
        raise AggregationOverflowError(
            "a padding slot of the decrypted sum is not zero; the ciphertexts were tampered with"
        )
    values = sums[:n_values]
    if width <= 8 and max_slot < (1 << 63):
        return cast(npt.NDArray[Any], values.astype(np.int64) - np.int64(offset))
    return np.array([int(s) - offset for s in values], dtype=object)

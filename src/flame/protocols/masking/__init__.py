"""Pairwise-mask secure aggregation (Bonawitz et al., CCS 2017): sums of bounded vectors at
close to plaintext cost, with no dealer and tolerating nodes that drop out.

prg (ChaCha20 masks mod 2**k), shamir (t-of-n shares of seeds), agreement (X25519 + HKDF,
sealed shares), encoding (Paillier's fixed point and bounds, in a ring), messages (bound and
signed), session, client, server (the rounds as state machines, no network), local (every
party in one process). Errors are SecureAggregationError subclasses.
"""

from flame.protocols.masking.client import MaskingClient
from flame.protocols.masking.encoding import RingInput, decode_sum, encode_to_ring, ring_bits
from flame.protocols.masking.errors import MaskingError, ProtocolViolation
from flame.protocols.masking.local import LocalRun, run_local
from flame.protocols.masking.messages import Binding, Message
from flame.protocols.masking.server import MaskedSum, MaskingServer
from flame.protocols.masking.session import Session

__all__ = [
    "Binding",
    "LocalRun",
    "MaskedSum",
    "MaskingClient",
    "MaskingError",
    "MaskingServer",
    "Message",
    "ProtocolViolation",
    "RingInput",
    "Session",
    "decode_sum",
    "encode_to_ring",
    "ring_bits",
    "run_local",
]

"""Secure sums inside a run: the aggregator adds what it cannot read.

The analyst marks values with `flame.secure(x)` in what `analyze` returns. Analysis nodes
encrypt them (Paillier, packed) before sending; the aggregator, holding only the public key,
adds the ciphertexts of each marked field over the nodes that answered, and sends the
encrypted sums back: one node (the reporter) decrypts and reports the plaintext sums, then
every other contributor checks that report against the ciphertexts (all of them, or a random
sample: `confirm_fraction`). A mismatch or a refusal stops the run. `aggregate` then sees
`results.secure[field]` (the sum) and `results.contributors[field]` (whose values it holds).

This module gathers the names the rest of flame imports; each job has its own module:
markers and result trees `flame.secure.marked`, keys `flame.secure.keys`, encrypting
`flame.secure.sealing`, the nodes' decryption `flame.secure.decrypt`; the aggregator's side
is `flame.secure.summer`, single-key decrypters' checks `flame.secure.single_key`, masking
`flame.secure.masking`.
"""

from __future__ import annotations

from flame.secure.decrypt import DECRYPT, DECRYPTED, answer_decrypt, answer_vectors
from flame.secure.keys import Precomputer, SecureKeys
from flame.secure.marked import Results, Secure, Summed, sealed_fields, secure, strip_sealed
from flame.secure.sealing import SCHEME, seal

__all__ = [
    "DECRYPT",
    "DECRYPTED",
    "SCHEME",
    "Precomputer",
    "Results",
    "Secure",
    "SecureKeys",
    "Summed",
    "answer_decrypt",
    "answer_vectors",
    "seal",
    "sealed_fields",
    "secure",
    "strip_sealed",
]

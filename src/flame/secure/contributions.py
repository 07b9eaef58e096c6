"""Signed threshold contributions: what an analysis node sends for one encrypted field and
how a share holder or the aggregator checks it.

The sealed scheme `CONTRIBUTION` frames a signature (Ed25519, the node's roster identity) over
(analysis, epoch, field, node, SHA-256 of the body); the body is a proof of plaintext knowledge
followed by the ciphertext vector. `sum_contributions` checks all of that and adds them.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from flame.errors import FlameError
from flame.wire.envelope import Sealed

if TYPE_CHECKING:
    from flame.protocols.paillier import EncryptedVector
    from flame.protocols.paillier.plaintext_proof import Opening
    from flame.protocols.paillier.threshold import ThresholdPublicKey

__all__ = [
    "CONTRIBUTION",
    "InvalidContributionError",
    "Signer",
    "Verifier",
    "check_proof",
    "check_scheme",
    "contribution_body",
    "contribution_digest_message",
    "contribution_message",
    "pack_contribution",
    "proof_context",
    "prove_contribution",
    "split_body",
    "sum_contributions",
    "unpack_contribution",
]

CONTRIBUTION = "paillier-t2"
"""Sealed scheme of a signed contribution: u16 signature length, signature, then the body:
u32 proof length, proof of plaintext knowledge, vector bytes. The signature and the
endorsement digests cover the whole body, so an endorsed set fixes the proofs too."""
OLD_CONTRIBUTIONS = ("paillier-t1",)
"""Schemes of earlier versions (no proof of plaintext knowledge): refused by name."""

Signer = Callable[[bytes], bytes]
"""Signs bytes with this node's roster identity."""
Verifier = Callable[[str, bytes, bytes], str | None]
"""(node id, message, signature) -> None if it is a valid signature of that analysis member
of the roster, else the reason it is not."""

_SIG_LEN = struct.Struct(">H")
_PROOF_LEN = struct.Struct(">I")


def contribution_message(analysis: str, epoch: int, path: str, node: str, body: bytes) -> bytes:
    """What a node signs for one encrypted field: binds it (proof and vector) to run,
    epoch, field and sender."""
    digest = hashlib.sha256(body).digest()
    return contribution_digest_message(analysis, epoch, path, node, digest)


def contribution_digest_message(
    analysis: str, epoch: int, path: str, node: str, digest: bytes
) -> bytes:
    """`contribution_message` from the vector's SHA-256 (endorsing sees only digests)."""
    parts = [b"flame-contribution-v2", analysis.encode(), str(epoch).encode(), path.encode()]
    return b"\0".join([*parts, node.encode(), digest])


def proof_context(public_key_id: str, analysis: str, epoch: int, path: str, node: str) -> bytes:
    """What a proof of plaintext knowledge is bound to: key, run, epoch, field and sender."""
    h = hashlib.sha256(b"flame-contribution-proof-v1\0")
    for part in (public_key_id, analysis, str(epoch), path, node):
        raw = part.encode()
        h.update(struct.pack(">Q", len(raw)) + raw)
    return h.digest()


def contribution_body(proof: bytes, vector: bytes) -> bytes:
    """The signed part of a contribution: the proof, then the vector."""
    return _PROOF_LEN.pack(len(proof)) + proof + vector


def _split_prefixed(
    data: bytes, length: struct.Struct, limit: int, truncated: str, malformed: str
) -> tuple[bytes, bytes]:
    """(the length-prefixed part, the rest) of `data`; FlameError if malformed."""
    if len(data) < length.size:
        raise FlameError(truncated)
    (size,) = length.unpack_from(data)
    if size > limit or len(data) < length.size + size:
        raise FlameError(malformed)
    return data[length.size : length.size + size], data[length.size + size :]


def split_body(body: bytes) -> tuple[bytes, bytes]:
    """(proof, vector bytes) of a contribution body; FlameError if malformed."""
    return _split_prefixed(
        body, _PROOF_LEN, 1 << 16, "contribution truncated",
        "contribution has a malformed proof of plaintext knowledge",
    )  # fmt: skip


def prove_contribution(
    public: ThresholdPublicKey,
    analysis: str,
    epoch: int,
    path: str,
    node: str,
    vector: EncryptedVector,
    opening: Opening,
) -> bytes:
    """The body of `node`'s contribution: `vector` with its proof of plaintext knowledge."""
    from flame.protocols.paillier.plaintext_proof import prove

    context = proof_context(public.key_id, analysis, epoch, path, node)
    proof = prove(public.n, vector.ciphertexts, opening, context)
    return contribution_body(proof, vector.to_bytes())


class InvalidContributionError(FlameError):
    """A contribution whose proof of plaintext knowledge fails; `node` is its sender."""

    def __init__(self, message: str, node: str) -> None:
        super().__init__(message)
        self.node = node


def check_proof(
    public: ThresholdPublicKey,
    analysis: str,
    epoch: int,
    path: str,
    node: str,
    proof: bytes,
    vector: EncryptedVector,
) -> None:
    """FlameError naming `node` if its proof of plaintext knowledge does not verify."""
    from flame.protocols.paillier.plaintext_proof import InvalidProofError, verify

    context = proof_context(public.key_id, analysis, epoch, path, node)
    try:
        verify(public.n, vector.ciphertexts, proof, context)
    except InvalidProofError as exc:
        raise InvalidContributionError(
            f"the contribution of {node!r} to {path!r} has no valid proof that {node!r} knows "
            f"its plaintexts ({exc}); it may be derived from other nodes' ciphertexts",
            node,
        ) from None


def pack_contribution(signature: bytes, body: bytes) -> bytes:
    return _SIG_LEN.pack(len(signature)) + signature + body


def unpack_contribution(data: bytes) -> tuple[bytes, bytes]:
    """(signature, body) of a signed contribution; FlameError if malformed."""
    return _split_prefixed(
        data, _SIG_LEN, 1024, "signed contribution truncated",
        "signed contribution has a malformed signature",
    )  # fmt: skip


def check_scheme(node: str, path: str, sealed: Any) -> None:
    """FlameError unless `sealed` is a contribution of this version (naming an old one)."""
    if isinstance(sealed, Sealed) and sealed.scheme in OLD_CONTRIBUTIONS:
        raise FlameError(
            f"the contribution of {node!r} to {path!r} is in the format {sealed.scheme!r} of an "
            f"older flame, without a proof of plaintext knowledge ({CONTRIBUTION!r} is "
            "required): every node of a threshold run must run the same flame version"
        )
    if not isinstance(sealed, Sealed) or sealed.scheme != CONTRIBUTION:
        raise FlameError(f"the contribution of {node!r} to {path!r} is not a signed one")


def sum_contributions(
    public: ThresholdPublicKey,
    analysis: str,
    epoch: int,
    path: str,
    contributions: Mapping[str, Any],
    verify: Verifier | None,
) -> EncryptedVector:
    """Check every signed contribution and add them; FlameError says what is wrong."""
    from flame.protocols.paillier import EncryptedVector

    vectors = []
    decoded: list[tuple[str, Any, EncryptedVector]] = []
    seen: set[bytes] = set()
    for node, sealed in sorted(contributions.items()):
        check_scheme(node, path, sealed)
        signature, body = unpack_contribution(bytes(sealed.data))
        if verify is not None:
            problem = verify(
                node, contribution_message(analysis, epoch, path, node, body), signature
            )
            if problem is not None:
                raise FlameError(f"the contribution of {node!r} to {path!r}: {problem}")
        proof, data = split_body(body)
        vector = EncryptedVector.from_bytes(data, public.paillier)
        if vector.contributors != 1:
            raise FlameError(
                f"the contribution of {node!r} to {path!r} claims to hold "
                f"{vector.contributors} contributions; one node sends one"
            )
        for c in vector.ciphertexts:
            raw = int(c).to_bytes((int(c).bit_length() + 7) // 8, "big")
            if raw in seen:
                raise FlameError(
                    f"the contribution of {node!r} to {path!r} repeats a ciphertext of "
                    "another contribution"
                )
            seen.add(raw)
        decoded.append((node, proof, vector))
    _refuse_the_odd_encoding(path, decoded)  # before any proof over a vector not summed
    for node, proof, vector in decoded:
        check_proof(public, analysis, epoch, path, node, proof, vector)
        vectors.append(vector)
    return EncryptedVector.sum(vectors)


def _refuse_the_odd_encoding(path: str, decoded: list[tuple[str, Any, EncryptedVector]]) -> None:
    """A contribution under another key, layout or shape than most is refused naming its
    sender, so the operator can tell who sent it (the sum alone would name nobody)."""
    counts = Counter((v.key_id, v.layout, v.shape) for _, _, v in decoded)
    ranked = counts.most_common(2)
    if len(ranked) < 2:
        return
    if ranked[0][1] == ranked[1][1]:
        raise FlameError(
            f"the contributions to {path!r} disagree on key, layout or shape with no majority: "
            "every node must mark it with the same flame.secure(..., bound=, precision=)"
        )
    for node, _, vector in decoded:
        if (vector.key_id, vector.layout, vector.shape) != ranked[0][0]:
            raise InvalidContributionError(
                f"the contribution of {node!r} to {path!r} has another key, layout or shape "
                "than most contributions",
                node,
            )


SIGNED = "paillier-s1"
"""Sealed scheme of a signed single-key contribution: u16 signature length, signature, the
vector's bytes."""


def sign_contribution(
    vector: bytes, signer: Signer, path: str, origin: tuple[str, int, str]
) -> Sealed:
    """`vector` signed by this node for (analysis, epoch, field `path`, node)."""
    analysis, epoch, node = origin
    signature = signer(contribution_message(analysis, epoch, path, node, vector))
    return Sealed(SIGNED, pack_contribution(signature, vector))

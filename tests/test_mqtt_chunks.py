"""Chunk framing and reassembly, without a broker: order, duplicates, limits, junk."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flame.errors import MessageError
from flame.wire.chunks import (
    CHUNK_HEADER_SIZE,
    ChunkError,
    ManifestCheck,
    ManifestSigner,
    Reassembler,
    decode_reference,
    encode_reference,
    frame_digest,
    split_frame,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def reassembler(**options: object) -> Reassembler:
    values: dict[str, object] = {"max_bytes": 10_000_000, "timeout": 10.0}
    values.update(options)
    return Reassembler(**values)


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.binary(min_size=0, max_size=3000), min_size=1, max_size=5),
    piece=st.integers(min_value=1, max_value=2000),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_split_then_reassemble_in_any_order_with_duplicates(
    parts: list[bytes], piece: int, seed: int
) -> None:
    whole = b"".join(parts)
    if not whole:
        parts = [b"x"]
        whole = b"x"
    chunks = list(split_frame(parts, piece))
    assert len(chunks) == -(-len(whole) // piece)
    assert all(len(c) <= CHUNK_HEADER_SIZE + piece for c in chunks)
    rng = random.Random(seed)
    order = chunks + rng.sample(chunks, k=min(3, len(chunks)))
    rng.shuffle(order)
    assembler = reassembler()
    results = [r for r in (assembler.add(c) for c in order) if r is not None]
    assert len(results) == 1
    assert bytes(results[0]) == whole and isinstance(results[0], bytearray)
    assert assembler.open_transfers == 0 and assembler.pending_bytes == 0


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=400))
def test_junk_is_a_chunk_error_or_ignored_never_a_crash(data: bytes) -> None:
    assembler = reassembler(max_bytes=100_000)
    try:
        assembler.add(b"FLC" + data)
        assembler.add(data)
    except ChunkError:
        pass
    assert assembler.pending_bytes <= 100_000


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_reference_junk_is_a_message_error(data: bytes) -> None:
    with contextlib.suppress(MessageError):
        decode_reference(b"FLR" + data)


def test_reference_round_trip() -> None:
    digest = hashlib.sha256(b"frame").digest()
    frame = encode_reference("s3://bucket/key", 5, digest)
    ref = decode_reference(frame)
    assert (ref.reference, ref.size, ref.sha256) == ("s3://bucket/key", 5, digest)
    with pytest.raises(ValueError):
        encode_reference("", 5, digest)


def test_checksum_mismatch_is_refused() -> None:
    chunks = list(split_frame([b"a" * 1000], 300))
    chunks[2][-1] ^= 1
    assembler = reassembler()
    for chunk in chunks[:-1]:
        assert assembler.add(chunk) is None
    with pytest.raises(ChunkError, match="SHA-256"):
        assembler.add(chunks[-1])
    assert assembler.pending_bytes == 0


def test_inconsistent_manifest_is_refused() -> None:
    first = list(split_frame([b"a" * 1000], 300, transfer_id=b"T" * 16))
    other = list(split_frame([b"b" * 1000], 300, transfer_id=b"T" * 16))
    assembler = reassembler()
    assembler.add(first[0])
    with pytest.raises(ChunkError, match="differs"):
        assembler.add(other[1])


def test_wrong_chunk_length_is_refused() -> None:
    chunk = next(split_frame([b"a" * 1000], 300))
    with pytest.raises(ChunkError, match="carries"):
        reassembler().add(chunk[:-1])


def test_limits_on_size_transfers_and_budget() -> None:
    big = list(split_frame([os.urandom(5000)], 1000))
    with pytest.raises(ChunkError, match="over the message limit"):
        reassembler(max_bytes=4000).add(big[0])

    assembler = reassembler(max_transfers=2)
    for _ in range(2):
        assembler.add(next(split_frame([os.urandom(3000)], 1000)))
    with pytest.raises(ChunkError, match="already open"):
        assembler.add(next(split_frame([os.urandom(3000)], 1000)))

    assembler = reassembler(max_total_bytes=5000)
    assembler.add(next(split_frame([os.urandom(3000)], 1000)))
    refused = list(split_frame([os.urandom(3000)], 1000))
    with pytest.raises(ChunkError, match="budget"):
        assembler.add(refused[0])
    # The rest of a refused transfer is dropped quietly: one log line per transfer.
    assert assembler.add(refused[1]) is None
    assert assembler.pending_bytes == 3000


def test_idle_transfer_expires_and_frees_its_memory() -> None:
    clock = Clock()
    assembler = reassembler(timeout=5.0, clock=clock)
    chunks = list(split_frame([os.urandom(4000)], 1000))
    assembler.add(chunks[0])
    clock.now = 4.0
    assembler.add(chunks[1])  # progress resets the idle timer
    clock.now = 8.0
    assert assembler.expire() == []
    clock.now = 9.5
    dropped = assembler.expire()
    assert len(dropped) == 1 and "2/4 chunks" in dropped[0]
    assert assembler.open_transfers == 0 and assembler.pending_bytes == 0
    assert assembler.add(chunks[2]) is None  # a straggler does not reopen it
    assert assembler.open_transfers == 0


def test_digest_over_parts_equals_digest_of_the_join() -> None:
    parts = [b"abc", memoryview(b"defg"), bytearray(b"h")]
    assert frame_digest(parts) == hashlib.sha256(b"abcdefgh").digest()


def test_duplicates_do_not_keep_a_stalled_transfer_alive() -> None:
    clock = Clock()
    assembler = reassembler(timeout=5.0, clock=clock)
    chunks = list(split_frame([os.urandom(4000)], 1000))
    assembler.add(chunks[0])
    for moment in (3.0, 6.0, 9.0):  # the attacker re-sends chunk 0 before every timeout
        clock.now = moment
        assert assembler.add(chunks[0]) is None
    assert len(assembler.expire()) == 1
    assert assembler.pending_bytes == 0


def _signer(name: str) -> tuple[ManifestSigner, ManifestCheck]:
    from flame.identity import Identity, Member, Roster
    from flame.identity.signing import Authenticator

    ids = {n: Identity.generate(n) for n in ("agg", name)}
    roster = Roster(
        [
            Member("agg", "aggregation", ids["agg"].public_text),
            Member(name, "analysis", ids[name].public_text),
        ]
    )
    sender = Authenticator(ids[name], roster).chunk_signer("study", "agg")
    return sender, Authenticator(ids["agg"], roster).chunk_check("study")


def test_signed_receiver_refuses_unsigned_and_forged_manifests_before_allocating() -> None:
    sign, check = _signer("alice")
    assembler = reassembler(check=check)
    frame = os.urandom(3500)
    with pytest.raises(ChunkError, match="unsigned chunk"):
        assembler.add(next(split_frame([frame], 1000)))
    honest = list(split_frame([frame], 1000, sign=sign))
    forged = bytearray(honest[0])
    forged[-1001] ^= 1  # the signature's last byte
    with pytest.raises(ChunkError, match="bad signature"):
        assembler.add(forged)
    assert assembler.open_transfers == 0 and assembler.pending_bytes == 0
    # The forgery reused the honest transfer id: the honest chunks still get through.
    results = [assembler.add(chunk) for chunk in honest]
    assert results[-1] == frame and assembler.pending_bytes == 0
    # A valid signature over another manifest (another recipient's, say) is refused too.
    other = list(split_frame([frame], 1000, sign=lambda m: sign(m[:-1] + b"x")))
    with pytest.raises(ChunkError, match="bad signature"):
        assembler.add(other[0])


def test_one_sender_cannot_take_the_whole_budget() -> None:
    sign, check = _signer("mallory")
    assembler = reassembler(
        check=check, max_bytes=4000, max_total_bytes=8000, max_sender_bytes=4000
    )
    assembler.add(next(split_frame([os.urandom(3000)], 1000, sign=sign)))
    with pytest.raises(ChunkError, match="'mallory'"):
        assembler.add(next(split_frame([os.urandom(3000)], 1000, sign=sign)))
    assert assembler.pending_bytes == 3000  # 5000 of the budget left for the others

"""FLAME_SECURE__SCHEME=masking in `flame simulate`: pooled sums equal the plaintext ones,
a node dropping mid-round leaves the survivors' exact sum, the contributor set is guarded
across epochs, values past their bound stop the node, and the wire carries about one word per
value."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest

import flame
from flame.config import load_config
from flame.errors import RunFailed
from flame.protocols.masking import Message
from flame.secure.masking import MASKED
from flame.testing import MemoryBroker
from flame.wire.envelope import Envelope, Sealed, encode_parts

SIZE = 2_000
rng = np.random.default_rng(5)
VALUES = {f"n{i}": rng.uniform(-50, 50, SIZE) for i in range(5)}
COUNTS = {node: 10 + i for i, node in enumerate(VALUES)}
DATA = {node: {"x.csv": "v\n1\n"} for node in VALUES}


def analyze(data: Any, epoch: int, previous: Any) -> dict[str, Any]:
    node = data.node_id
    return {
        "vec": flame.secure(VALUES[node] + epoch),
        "count": flame.secure(COUNTS[node], precision=0),
        "plain": 1,
    }


def aggregate(results: Any, epoch: int, previous: Any) -> dict[str, Any]:
    return {
        "vec": results.secure["vec"],
        "count": results.secure["count"],
        "who": results.contributors["vec"],
        "placeholder": repr(results[sorted(results)[0]]["vec"]),
    }


def config(**secure: Any) -> flame.FlameConfig:
    timing = {"epoch_timeout": 3, "presence_timeout": 20}
    epochs = secure.pop("epochs", 1)
    settings = {"enabled": True, "scheme": "masking", "bound": 100.0, **secure}
    return load_config(secure=settings, epochs=epochs, **timing)


def exact(nodes: list[str], epoch: int = 0) -> np.ndarray:
    return sum(np.rint((VALUES[v] + epoch) * 2**16).astype(np.int64) for v in nodes) / 2**16


class DropMasked:
    """Memory-broker filter: `node` goes silent in the masked sum of `epoch` from its
    `after`-th reply on (1: shares, 2: masked input, 3: consistency, 4: reveal)."""

    def __init__(self, node: str, epoch: int, after: int) -> None:
        self.node, self.epoch, self.after = node, epoch, after
        self.replies: Counter[int] = Counter()

    def __call__(self, envelope: Envelope) -> bool:
        if envelope.category != MASKED or envelope.sender != self.node:
            return True
        self.replies[envelope.epoch] += 1
        return not (envelope.epoch == self.epoch and self.replies[envelope.epoch] >= self.after)


def test_masked_sums_equal_the_plaintext_sums_over_epochs() -> None:
    result = flame.simulate(analyze, aggregate, data=DATA, config=config(epochs=2))
    assert result.value["who"] == sorted(VALUES)
    assert result.value["count"] == sum(COUNTS.values())
    assert isinstance(result.value["count"], int)
    assert np.array_equal(result.value["vec"], exact(sorted(VALUES), epoch=1))
    assert "securely summed" in result.value["placeholder"]
    assert result.epochs == 2


@pytest.mark.parametrize(("after", "counted"), [(2, False), (3, True), (4, True)])
def test_a_node_dropping_mid_round_leaves_the_survivors_exact_sum(
    after: int, counted: bool
) -> None:
    broker = MemoryBroker(on_send=DropMasked("n2", 0, after))
    result = flame.simulate(analyze, aggregate, data=DATA, config=config(), broker=broker)
    nodes = sorted(VALUES) if counted else [v for v in sorted(VALUES) if v != "n2"]
    assert result.value["who"] == nodes
    assert np.array_equal(result.value["vec"], exact(nodes))
    assert result.value["count"] == sum(COUNTS[v] for v in nodes)


def test_too_many_dropouts_fail_the_run_naming_the_threshold() -> None:
    drops = [DropMasked(v, 0, 2) for v in ("n1", "n2")]
    broker = MemoryBroker(on_send=lambda e: all(d(e) for d in drops))
    with pytest.raises(RunFailed, match=r"masked secure sum of .* failed: .*threshold needs 4"):
        flame.simulate(analyze, aggregate, data=DATA, config=config(), broker=broker)


def test_the_contributor_set_is_guarded_across_epochs() -> None:
    """Epoch 0 sums all five; in epoch 1 n2 drops after sharing keys: a sum of four could be
    differenced against epoch 0's, so the nodes refuse to sign it."""
    broker = MemoryBroker(on_send=DropMasked("n2", 1, 2))
    with pytest.raises(RunFailed, match=r"fixed by its first masked sum.*leave out \['n2'\]"):
        flame.simulate(analyze, aggregate, data=DATA, config=config(epochs=2), broker=broker)
    broker = MemoryBroker(on_send=DropMasked("n2", 1, 2))
    allowed = config(epochs=2, allow_changing_contributors=True)
    result = flame.simulate(analyze, aggregate, data=DATA, config=allowed, broker=broker)
    assert result.value["who"] == ["n0", "n1", "n3", "n4"]


def test_a_value_past_its_bound_stops_the_node_before_anything_is_masked() -> None:
    with pytest.raises(RunFailed, match=r"vec\[\d+\] is outside the declared bound"):
        flame.simulate(analyze, aggregate, data=DATA, config=config(bound=40.0))


def test_the_wire_carries_masked_words_not_values_at_about_plaintext_size() -> None:
    """40,000 floats a node: every byte of the masked run (results, all four rounds, acks)
    against the plaintext run's results; the masked input is one ring word a value (32 bits
    here: bound 100, precision 16, 100 nodes fit), none equal to the encoded value."""
    big = {v: np.random.default_rng(i).uniform(-50, 50, 40_000) for i, v in enumerate(VALUES)}
    sizes: Counter[str] = Counter()
    masked: dict[str, bytes] = {}

    def count(envelope: Envelope) -> bool:
        if envelope.kind in ("result", "message", "ack"):
            sizes["secure"] += sum(len(p) for p in encode_parts(envelope))
        if envelope.category == MASKED and isinstance(envelope.body, dict):
            for item in envelope.body.get("messages", {}).values():
                msg = Message.from_bytes(item.data) if isinstance(item, Sealed) else None
                if msg is not None and msg.round == "masked":
                    masked[envelope.sender] = msg.vector
        return True

    def analyze_big(data: Any, epoch: int, previous: Any) -> dict[str, Any]:
        return {"vec": flame.secure(big[data.node_id])}

    def analyze_plain(data: Any, epoch: int, previous: Any) -> dict[str, Any]:
        return {"vec": big[data.node_id]}

    def count_plain(envelope: Envelope) -> bool:
        if envelope.kind in ("result", "message", "ack"):
            sizes["plain"] += sum(len(p) for p in encode_parts(envelope))
        return True

    flame.simulate(
        analyze_big,
        lambda results: 0,
        data=DATA,
        config=config(),
        broker=MemoryBroker(on_send=count),
    )
    flame.simulate(
        analyze_plain,
        lambda results: 0,
        data=DATA,
        epochs=1,
        broker=MemoryBroker(on_send=count_plain),
    )
    assert sizes["secure"] <= 1.5 * sizes["plain"], sizes
    assert set(masked) == set(VALUES)
    for node, vector in masked.items():
        words = np.frombuffer(vector, dtype="<u4")
        encoded = np.rint(big[node] * 2**16).astype(np.int64).astype(np.uint32)
        assert len(vector) == 4 * 40_000 and not np.any(words == encoded)


# --- the guard ledger in node-local state ---------------------------------------------------


def _guard(state: Any, key: Any, allow: bool = False) -> Any:
    from flame.secure.masking_guard import MaskingGuard

    return MaskingGuard("ana", "n1", state=state, identity=key, allow_changing=allow)


def test_a_restarted_node_still_refuses_a_differing_set() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from flame.aggregator.run_store import MemoryState
    from flame.protocols.masking import ProtocolViolation

    state, key = MemoryState(), Ed25519PrivateKey.generate()
    first = _guard(state, key)
    first.record(0, "vec", first.check(0, "vec", ["n0", "n1", "n2"]))
    restarted = _guard(state, key)  # a new process: only the state is left
    with pytest.raises(ProtocolViolation, match=r"fixed by its first masked sum.*\['n2'\]"):
        restarted.check(1, "vec", ["n0", "n1"])
    assert restarted.check(1, "vec", ["n0", "n1", "n2"]) == ("n0", "n1", "n2")
    lenient = _guard(state, key, allow=True)  # the setting lifts the first rule only
    assert lenient.check(1, "vec", ["n0", "n1"]) == ("n0", "n1")
    with pytest.raises(ProtocolViolation, match="already signed another contributor set"):
        lenient.check(0, "vec", ["n0", "n1"])


def test_a_changed_or_foreign_ledger_is_refused_not_reset() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from flame.aggregator.run_store import MemoryState
    from flame.protocols.masking import ProtocolViolation
    from flame.secure.masking_guard import TAG

    state, key = MemoryState(), Ed25519PrivateKey.generate()
    guard = _guard(state, key)
    guard.record(0, "vec", guard.check(0, "vec", ["n0", "n1", "n2"]))
    with pytest.raises(ProtocolViolation, match="changed, foreign or corrupt"):
        _guard(state, Ed25519PrivateKey.generate()).check(1, "vec", ["n0", "n1"])
    saved = state.load(TAG)
    state.save(TAG, {**saved, "fixed": None, "signed": []})  # an operator "resetting" it
    with pytest.raises(ProtocolViolation, match="changed, foreign or corrupt"):
        _guard(state, key).check(1, "vec", ["n0", "n1"])


def test_a_ledger_that_cannot_be_written_means_no_signature() -> None:
    from flame.protocols.masking import ProtocolViolation

    class Broken:
        def save(self, tag: str, value: Any) -> None:
            raise OSError("disk full")

        def load(self, tag: str, default: Any = None) -> Any:
            return default

    guard = _guard(Broken(), None)
    with pytest.raises(ProtocolViolation, match="cannot write the masking guard ledger"):
        guard.record(0, "vec", guard.check(0, "vec", ["n0", "n1"]))

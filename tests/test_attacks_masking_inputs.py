"""What masking does NOT protect: the sum's integrity and availability against a contributor.

Masking hides each node's input; it does not prove that the input lies within its bound (no
range proofs). A malicious node (`ROGUE`) skips its own bound check and masks whatever it
likes, and every other party follows the protocol:

* an input that pushes the unmasked sum outside what the contributors' bounds allow is caught
  by the decoder's range check, which REFUSES the sum (never a wrong value); the refusal
  cannot say which node sent it, and any contributor can stop every masked sum this way;
* an input that keeps the sum within that range (an offset, even one past the rogue's own
  bound) shifts the sum by exactly what it added, undetected: input poisoning, inherent to
  secure aggregation without input validation.

These tests pin that behaviour (they pass on the code as it is); the docs say the same
(docs/explanation/masking.md "What one colluding node can still do", docs/threat-model.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from masking_parties import SPEC, Party, nodes

import flame
from flame.config import load_config
from flame.errors import RunFailed
from flame.protocols.masking import Binding, MaskingClient, Session
from flame.protocols.masking.encoding import RingInput
from flame.protocols.paillier.errors import AggregationOverflowError
from flame.testing import MemoryBroker

SCALE = 2**16  # SPEC's precision
BOUND = SPEC.bound  # 1024: every honest value lies within +-BOUND


def encoded(values: Any) -> Any:
    return np.rint(np.asarray(values, dtype=np.float64) * SCALE).astype(np.int64)


def rogue_input(sess: Session, values: Any) -> RingInput:
    """A RingInput of `values` as the rogue builds it: its own bound check skipped."""
    return RingInput(encoded(values).astype(sess.dtype), sess.spec)


def masked_sum(party: Party, rogue: str, rogue_values: Any) -> Any:
    """Rounds 0-4 and the unmasked sum, every node honest but `rogue`, whose masked input
    encodes `rogue_values` (past its bound or not)."""
    party.share_keys()
    for v, m in party.server.ciphertexts().items():
        values = rogue_input(party.sess, rogue_values) if v == rogue else party.values[v]
        party.server.receive(party.clients[v].masked_input(m.to_bytes(), values).to_bytes())
    for v, m in party.server.survivors().items():
        party.server.receive(party.clients[v].consistency(m.to_bytes()).to_bytes())
    for v, m in party.server.unmask().items():
        party.server.receive(party.clients[v].reveal(m.to_bytes()).to_bytes())
    return party.server.result()


def fresh_party() -> tuple[Party, str]:
    sess = Session(Binding("ana", 0, "x"), nodes(5), 4, SPEC)
    return Party(sess, length=4), sess.participants[1]


@pytest.mark.parametrize(
    "rogue_value",
    [
        pytest.param(10 * BOUND, id="ten-bounds"),
        pytest.param(-10 * BOUND, id="minus-ten-bounds"),
        pytest.param(5 * BOUND + 1, id="just-past-n-bounds"),
    ],
)
def test_an_out_of_range_masked_input_makes_the_sum_refused_never_wrong(
    rogue_value: float,
) -> None:
    """ATTACK (one contributor, round 2): its masked input encodes a value no honest node
    could send. The masks cancel, the sum lies outside n * bound: the decoder refuses it.
    No value comes out, and the refusal cannot name the sender (only the sum is seen)."""
    party, rogue = fresh_party()
    with pytest.raises(AggregationOverflowError, match="Refusing the sum") as caught:
        masked_sum(party, rogue, np.full(4, rogue_value))
    assert rogue not in str(caught.value)


@pytest.mark.parametrize(
    "offset",
    [
        pytest.param(np.array([500.0, -500.0, 0.25, 900.0]), id="within-its-bound"),
        pytest.param(np.array([3 * BOUND, -3 * BOUND, 2 * BOUND, 0.0]), id="past-its-bound"),
    ],
)
def test_an_in_range_offset_shifts_the_sum_by_exactly_the_offset_undetected(
    offset: Any,
) -> None:
    """ATTACK (input poisoning): the rogue adds `offset` to its true values. While the sum
    stays within n * bound, nothing can tell: the sum comes out with every node counted
    and is shifted by exactly the offset. Masking gives confidentiality, not integrity."""
    party, rogue = fresh_party()
    total = masked_sum(party, rogue, party.values[rogue] + offset)
    honest = sum(encoded(party.values[v]) for v in party.sess.participants)
    assert total.contributors == party.sess.participants  # nobody was refused
    assert np.array_equal(
        total.encoded - honest, encoded(party.values[rogue] + offset) - encoded(party.values[rogue])
    )
    assert np.allclose((total.encoded - honest) / SCALE, offset, atol=1 / SCALE)


# --- the same in a run: `flame simulate` with a roster, the rogue's client hooked ----------

MEMBERS = ("n0", "n1", "n2", "n3", "n4")
ROGUE = "n1"
VALUES = {v: np.random.default_rng(7).uniform(-100, 100, 3) + i for i, v in enumerate(MEMBERS)}


@contextmanager
def rogue_adds(monkeypatch: pytest.MonkeyPatch, offset: Any) -> Iterator[None]:
    """ROGUE masks its values + `offset`, its own bound check skipped; the others honest."""
    masked_input = MaskingClient.masked_input

    def hooked(self: MaskingClient, ciphertexts: Any, values: Any, **kw: Any) -> Any:
        if self.node_id == ROGUE:
            values = rogue_input(self.session, VALUES[ROGUE] + offset)
        return masked_input(self, ciphertexts, values, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(MaskingClient, "masked_input", hooked)
        yield


def simulate() -> Any:
    config = load_config(
        secure={"enabled": True, "scheme": "masking", "bound": BOUND},
        epoch_timeout=30,
        presence_timeout=30,
    )
    return flame.simulate(
        lambda data, epoch, previous: {"x": flame.secure(VALUES[data.node_id])},
        lambda results, epoch, previous: (results.secure["x"], results.contributors["x"]),
        data={v: {"v.csv": "v\n1\n"} for v in MEMBERS},
        config=config,
        broker=MemoryBroker(),
    )


def test_in_a_run_one_out_of_range_input_fails_the_run_without_a_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Availability: one contributor stops the masked sum; the run fails (no value), the
    error says the sum was refused, and it cannot name who caused it."""
    with rogue_adds(monkeypatch, 20 * BOUND), pytest.raises(RunFailed) as caught:
        simulate()
    text = str(caught.value)
    assert "masked secure sum of 'x' in epoch 0 failed" in text and "Refusing the sum" in text
    assert ROGUE not in text


def test_in_a_run_an_in_range_offset_shifts_the_result_undetected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    offset = np.array([250.0, -40.5, 3 * BOUND])  # the last past the rogue's own bound
    with rogue_adds(monkeypatch, offset):
        total, who = simulate().value
    honest = sum(encoded(VALUES[v]) for v in MEMBERS) / SCALE
    assert who == list(MEMBERS)  # the rogue is a contributor like any other
    assert np.allclose(total - honest, offset, atol=1 / SCALE)
    shift = sum(encoded(VALUES[v]) for v in MEMBERS if v != ROGUE) + encoded(VALUES[ROGUE] + offset)
    assert np.array_equal(total, shift / SCALE)

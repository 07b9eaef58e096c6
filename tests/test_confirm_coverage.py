"""Confirmations cover as much of the reported sum as all confirmers would (red team B3):
with most confirmers held back, the ones that answer check more; else the epoch fails."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from flame.errors import RunFailed
from flame.protocols.paillier import (
    EncryptedVector,
    SecureSumSpec,
    decrypt_vector,
    encrypt_vector,
    generate_keypair,
    verify_reported_sum,
)
from flame.secure.fields import SecureKeys
from flame.secure.summer import SecureSummer
from flame.wire.envelope import Sealed


def _setup() -> tuple[Any, ...]:
    public, private = generate_keypair(512, allow_insecure=True)
    spec = SecureSumSpec(precision=16, bound=1000.0, max_nodes=16)
    nodes = [f"node-{i}" for i in range(10)]
    rng = np.random.default_rng(3)
    total = EncryptedVector.sum([encrypt_vector(rng.uniform(-9, 9, 40), private, spec)
                                 for _ in nodes])  # fmt: skip
    honest = decrypt_vector(total, private, spec, min_contributors=2)
    summer = SecureSummer(SecureKeys(public, None, spec, min_contributors=2), timeout=1.0)
    return summer, total, private, spec, nodes, honest


@pytest.mark.parametrize("answer_again", [True, False])
def test_held_confirmers_widen_the_check_or_fail_the_epoch(answer_again: bool) -> None:
    summer, total, private, spec, nodes, honest = _setup()
    asked: list[float] = []

    def ask(epoch: int, who: list[str], body: dict, *, required: bool = True) -> dict:
        if "reported" not in body:
            return {who[0]: {"sums": {"total": honest}}}
        asked.append(body["fraction"])
        if len(asked) > 1 and not answer_again:
            return {}
        checked = verify_reported_sum(total, private, spec, body["reported"]["total"],
                                      min_contributors=2, fraction=body["fraction"])  # fmt: skip
        return {who[0]: {"confirmed": checked}}  # only one confirmer gets through

    summer._ask = ask  # type: ignore[method-assign]
    sums = {"total": Sealed("paillier", total.to_bytes())}
    if answer_again:
        released = summer._decrypt(0, sums, {"total": nodes})
        assert np.array_equal(released["total"], honest)
        # 9 confirmers at 1/3 each: a lie escapes with (2/3)^9; one confirmer must check
        # 1 - (2/3)^9 of the ciphertexts for the same chance
        assert asked[0] == pytest.approx(1 / 3) and asked[1] == pytest.approx(1 - (2 / 3) ** 9)
    else:
        with pytest.raises(RunFailed, match="confirmed over too little"):
            summer._decrypt(0, sums, {"total": nodes})

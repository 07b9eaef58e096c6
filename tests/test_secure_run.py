"""Secure aggregation inside a run: sums equal the plaintext ones, the aggregator never holds
the private key, and every refusal stops the run with a clear reason."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import flame
from flame.config import load_config
from flame.errors import ConfigError, RunFailed
from flame.protocols.paillier import write_keypair
from flame.testing import MemoryBroker
from flame.wire.envelope import Envelope, Sealed

NODES = {
    "a": {"x.csv": "v,w\n1.5,-2\n2.25,4\n"},
    "b": {"x.csv": "v,w\n-3.125,8\n"},
    "c": {"x.csv": "v,w\n10,0.5\n7,1\n0,0\n"},
}


def analyze(data, epoch, previous):
    table = data.read_csv()
    x = np.column_stack([table["v"], table["w"]])
    shift = 0.0 if previous is None else previous["epoch_marker"]
    return {"n": len(x), "total": flame.secure(x.sum(axis=0) + shift)}


def aggregate(results, epoch, previous):
    return {
        "n": sum(r["n"] for r in results.values()),
        "total": results.secure["total"],
        "who": results.contributors["total"],
        "placeholder": repr(results[sorted(results)[0]]["total"]),
        "epoch_marker": float(epoch + 1),
    }


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_keypair(tmp_path_factory.mktemp("keys"), 2048)


def secure_config(keys: tuple[Path, Path], **changes: object) -> flame.FlameConfig:
    public, private = keys
    settings = {"enabled": True, "public_key_file": public, "private_key_file": private}
    settings.update(changes.pop("secure", {}))  # type: ignore[arg-type]
    timing: dict[str, object] = {"epoch_timeout": 20, "presence_timeout": 20, **changes}
    return load_config(secure=settings, **timing)


def plain_totals(nodes: dict[str, dict[str, str]]) -> np.ndarray:
    rows = [
        [float(cell) for cell in line.split(",")]
        for files in nodes.values()
        for text in files.values()
        for line in text.strip().splitlines()[1:]
    ]
    return np.array(rows).sum(axis=0)


def test_secure_sum_equals_the_plaintext_sum_over_epochs(keys, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    result = flame.simulate(analyze, aggregate, data=NODES, config=secure_config(keys, epochs=3))
    expected = plain_totals(NODES) + 3 * 2.0  # epoch 2: each of 3 nodes adds marker 2.0
    precision = 3 * 2.0 ** -(16 + 1) * 4
    assert np.allclose(result.value["total"], expected, atol=precision, rtol=0)
    assert result.value["who"] == ["a", "b", "c"]
    assert "securely summed" in result.value["placeholder"]
    assert result.epochs == 3
    private_text = keys[1].read_text()
    digits = [part for part in private_text.replace('"', " ").split() if len(part) > 40]
    assert digits, "the private key file should hold long key material"
    assert not any(d in caplog.text for d in digits)


def test_secure_sum_covers_only_the_nodes_that_answered(keys) -> None:
    broker = MemoryBroker(on_send=lambda e: not (e.kind == "result" and e.sender == "c"))
    config = secure_config(keys, quorum=2, epoch_timeout=1.5)
    result = flame.simulate(analyze, aggregate, data=NODES, config=config, broker=broker)
    expected = plain_totals({k: v for k, v in NODES.items() if k != "c"})
    assert result.value["who"] == ["a", "b"]
    assert np.allclose(result.value["total"], expected, atol=1e-3)
    assert result.history[0].missing == ["c"]


def test_nodes_refuse_to_decrypt_a_sum_of_too_few_contributors(keys) -> None:
    config = secure_config(keys, secure={"min_contributors": 2})
    with pytest.raises(RunFailed, match=r"refused to (decrypt|endorse).*at least 2"):
        flame.simulate(analyze, aggregate, data={"a": NODES["a"]}, config=config)


def test_a_value_past_the_declared_bound_fails_at_the_node(keys) -> None:
    config = secure_config(keys, secure={"bound": 5.0})
    bound_error = r"node '[bc]' failed in epoch 0: .*total\[.*outside the declared bound"
    with pytest.raises(RunFailed, match=bound_error):
        flame.simulate(analyze, aggregate, data=NODES, config=config)


def test_secure_values_without_secure_aggregation_are_refused() -> None:
    with pytest.raises(RunFailed, match="FLAME_SECURE__ENABLED"):
        flame.simulate(analyze, aggregate, data=NODES, epochs=1)


def test_a_forged_ciphertext_is_refused_naming_the_node(keys) -> None:
    def forging(data, epoch, previous):
        return {"n": 1, "total": Sealed("paillier", b"\x00" * 64)}

    def honest_or_forged(data, epoch, previous):
        if data.node_id == "b":
            return forging(data, epoch, previous)
        return analyze(data, epoch, previous)

    with pytest.raises(RunFailed, match=r"node 'b' sent an invalid encrypted 'total'"):
        flame.simulate(honest_or_forged, aggregate, data=NODES, config=secure_config(keys))


def test_the_aggregator_refuses_a_private_key(keys) -> None:
    from flame.secure.fields import SecureKeys

    with pytest.raises(ConfigError, match="must not hold the private key"):
        SecureKeys.from_settings(secure_config(keys).secure, role="aggregation")


def test_an_aggregation_node_started_with_a_private_key_exits_clearly(keys, tmp_path) -> None:
    (tmp_path / "analysis.py").write_text(
        "def analyze(data):\n    return 1\n\ndef aggregate(results):\n    return 1\n"
    )
    env = {
        **os.environ,
        "FLAME_NODE_ID": "aggregator",
        "FLAME_ROLE": "aggregation",
        "FLAME_PARTICIPANTS": "a,b",
        "FLAME_BROKER__URL": "mqtt://127.0.0.1:9",
        "FLAME_SECURE__ENABLED": "true",
        "FLAME_SECURE__PUBLIC_KEY_FILE": str(keys[0]),
        "FLAME_SECURE__PRIVATE_KEY_FILE": str(keys[1]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "flame", "run", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "must not hold the private key" in done.stderr
    assert "Traceback" not in done.stderr
    assert keys[1].read_text()[-60:-5] not in done.stderr


def test_decryption_request_from_a_stranger_epoch_is_answered_with_an_error(keys) -> None:
    from flame.secure.fields import SecureKeys, answer_decrypt

    node_keys = SecureKeys.from_settings(secure_config(keys).secure, role="analysis")
    request = Envelope("x", "aggregator", "a", "message", 0, {"sums": "nope"})
    assert "error" in answer_decrypt(request, node_keys, "a")

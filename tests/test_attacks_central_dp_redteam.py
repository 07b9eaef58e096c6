"""Red team: central DP at the aggregator (flame.privacy.central, the aggregator's release).

Each test asserts the CLAIMED behaviour (docs/how-to/node-policy-dp.md, "Central DP at the
aggregator"): the aggregator runtime checks every flame.dp marker `aggregate` returns, charges
its own ledger before drawing the noise once, a refused or failed release leaves the exact
value nowhere, forged markers are refused. A test that fails here is an attack that worked;
the passing ones are regression guards for attacks that did not.

`aggregate` runs in the aggregator's own process (only `analyze` is isolated), so the
"analyst" seat below is ordinary Python returned from `aggregate`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flame
from flame.aggregator.records import Checkpoint, RunResult
from flame.dp import Noise, gaussian_sigma
from flame.errors import FlameError, RunFailed
from flame.privacy.central import AggregatorPolicy, CentralDP

EXACT = 7777.123456789  # the pooled total of VALUES
EXACT_FORMS = [b"7777.12345", struct.pack("<d", EXACT), struct.pack(">d", EXACT)]
VALUES = {"node-1": [1000.0, 2000.123456789], "node-2": [3000.0], "node-3": [1777.0]}


def entries(folder: Path, node: str = "aggregator") -> list[dict[str, Any]]:
    path = folder / f"{node}--aggregate.json"
    return json.loads(path.read_text())["entries"] if path.exists() else []


def central(folder: Path, epsilon: float = 1.0, delta: float = 0.0) -> CentralDP:
    policy = AggregatorPolicy(epsilon_budget=epsilon, delta_budget=delta, ledger_dir=folder)
    return CentralDP(policy, node_id="aggregator", analysis_id="study")


def write_study(folder: Path, aggregate_body: str, prelude: str = "") -> Path:
    """An analysis whose nodes each send their values' sum; `aggregate` returns
    `aggregate_body` (an expression of `total`, the exact pooled sum)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "analysis.py").write_text(
        textwrap.dedent(
            """
            import flame
            {prelude}

            def analyze(data):
                return sum(float(v) for v in data.read_text("values.csv").split()[1:])

            def aggregate(results):
                total = sum(results.values())
                return {body}
            """
        ).format(prelude=textwrap.dedent(prelude), body=aggregate_body)
    )
    for node, values in VALUES.items():
        (folder / "data" / node).mkdir(parents=True, exist_ok=True)
        (folder / "data" / node / "values.csv").write_text(
            "value\n" + "\n".join(repr(v) for v in values) + "\n"
        )
    assert math.isclose(sum(sum(v) for v in VALUES.values()), EXACT)
    return folder


def leaks(texts: dict[str, bytes]) -> list[str]:
    return [where for where, data in texts.items() if any(form in data for form in EXACT_FORMS)]


def run_cli(tmp_path: Path, folder: Path, *, epochs: int = 1) -> tuple[Any, dict[str, bytes]]:
    """`flame simulate` as a CLI user runs it; every text it leaves behind, by where."""
    policy = tmp_path / "aggregator.toml"
    policy.write_text('epsilon_budget = 10.0\nledger_dir = "ledger"\n')
    output = tmp_path / "out" / "run.json"
    output.parent.mkdir(exist_ok=True)
    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAME_")}
    env["FLAME_STORAGE__RESULTS_DIR"] = str(store)
    env["FLAME_LOG_LEVEL"] = "DEBUG"
    done = subprocess.run(
        [
            sys.executable, "-m", "flame", "simulate", str(folder / "analysis.py"),
            "--data", str(folder / "data"), "--epochs", str(epochs),
            "--aggregator-policy", str(policy), "--output", str(output), "--verbose",
        ],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    texts = {"stdout": done.stdout.encode(), "stderr": done.stderr.encode()}
    for path in [*tmp_path.joinpath("out").rglob("*"), *store.rglob("*")]:
        if path.is_file():
            texts[str(path)] = path.read_bytes()
    for path in (tmp_path / "ledger").rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes()
    return done, texts


# --- seat 1: the analyst's aggregate: markers in containers the release does not walk -----------


@pytest.mark.parametrize(
    "body, prelude",
    [
        ('{"table": pd.DataFrame({"total": [flame.dp.laplace(total, 1.0, 0.5)]})}',
         "import pandas as pd"),
        ('{"cells": pd.Series([flame.dp.laplace(total, 1.0, 0.5)])}', "import pandas as pd"),
        ("{flame.dp.laplace(total, 1.0, 0.5): 'noised'}", ""),
    ],
    ids=["dataframe-cell", "series-cell", "dict-key"],
)  # fmt: skip
def test_a_marker_the_release_does_not_walk_never_prints_its_exact_value(
    tmp_path: Path, body: str, prelude: str
) -> None:
    """ATTACK: a marker in a pandas table (a plausible way to return noised cells) or used as
    a dict key is neither noised nor refused by CentralDP; the wire encoder then fails on it
    and its error text carries repr(Noise) = 'Noise(values=7777.123456789, ...)' into the
    run's failure reason: stderr, the --output JSON, the report, and (flame run) every node's
    abort. Claimed: a marker anywhere is released with noise or refused naming no value."""
    folder = write_study(tmp_path / "study", body, prelude)
    done, texts = run_cli(tmp_path, folder)
    assert done.returncode != 0, "a marker that cannot be released must not give a result"
    assert not leaks(texts), f"the exact aggregate is in {leaks(texts)}"


def test_a_dict_subclass_cannot_hide_a_marker_from_the_release(tmp_path: Path) -> None:
    """ATTACK: a dict subclass whose items() yields nothing hides its marker from `_walk`:
    nothing is charged and flame.simulate returns the marker with its exact `values`.
    Claimed: every marker in a dict is charged and noised (or the release is refused)."""
    folder = write_study(
        tmp_path / "study",
        "Hiding(total=flame.dp.laplace(total, 1.0, 0.5))",
        """
        class Hiding(dict):
            def items(self):
                return iter(())
        """,
    )
    from flame.analysis.loader import load_analysis

    functions = load_analysis(folder / "analysis.py").functions
    policy = AggregatorPolicy(epsilon_budget=10.0, ledger_dir=tmp_path / "ledger")
    try:
        result = flame.simulate(
            functions.analyze, functions.aggregate, data=folder / "data", aggregator_policy=policy
        )
    except RunFailed as exc:  # refused: fine, if it names no value
        assert not leaks({"error": str(exc).encode()})
        return
    hidden = [v for v in dict.values(result.value) if isinstance(v, Noise)]
    assert not hidden, "an un-noised, uncharged marker came out of the run"
    assert entries(tmp_path / "ledger"), "a released marker must be charged"


class _RaddTo(float):
    """A float whose `0.0 + self` (the ledger's sum) is what the analyst chose."""

    charged: float = 0.0

    def __radd__(self, other: Any) -> Any:
        return other + self.charged


class _NanCharge(_RaddTo):
    charged = float("nan")


class _Refund(_RaddTo):
    charged = -1e6


@pytest.mark.parametrize("kind", [_NanCharge, _Refund], ids=["nan-charge", "negative-charge"])
def test_a_float_subclass_epsilon_is_a_forged_marker(tmp_path: Path, kind: type[float]) -> None:
    """ATTACK: Noise(total, 'laplace', 1.0, F(1e9)) with F a float subclass passes Noise.check
    (isinstance float, float(F) finite and positive), but Spend's sum `0.0 + F` calls
    F.__radd__: the ledger records NaN (every later comparison is False: the budget is off for
    good, for every analysis of this scope) or -1e6 (a refund), while the noise uses the real
    epsilon 1e9 (scale 1e-9: the exact value). Claimed: a forged marker is refused and
    nothing is charged."""
    dp = central(tmp_path, epsilon=1.0)
    forged = Noise(EXACT, "laplace", 1.0, kind(1e9))
    with pytest.raises(RunFailed):
        dp.release({"total": forged}, 0)
    assert all(math.isfinite(e["epsilon"]) and e["epsilon"] >= 0 for e in entries(tmp_path)), (
        f"the ledger now holds {entries(tmp_path)}"
    )
    # whatever happened, an honest release far over the budget is still refused
    with pytest.raises(RunFailed, match="epsilon_budget"):
        central(tmp_path, epsilon=1.0).release({"t": flame.dp.laplace(EXACT, 1.0, 50.0)}, 1)


@pytest.mark.parametrize(
    "entry",
    [{"epsilon": float("nan"), "delta": 0.0}, {"epsilon": -100.0, "delta": 0.0}],
    ids=["nan", "negative"],
)
def test_a_ledger_holding_a_nan_or_negative_spend_refuses_to_spend(
    tmp_path: Path, entry: dict[str, float]
) -> None:
    """ATTACK (operator's disk / a forged charge above): the ledger sums its entries with
    float() and compares with `>`; a NaN entry makes every charge fit, a negative one refunds.
    Claimed (ledger doc): a ledger that cannot be trusted refuses to spend until repaired."""
    path = tmp_path / "aggregator--aggregate.json"
    path.write_text(
        json.dumps({"scope": "aggregate", "node": "aggregator", "entries": [
            {"analysis": "x", "epoch": 0, "time": 0.0, **entry}]})
    )  # fmt: skip
    with pytest.raises(RunFailed):
        central(tmp_path, epsilon=1.0).release({"t": flame.dp.laplace(EXACT, 1.0, 5.0)}, 0)


class _LazyValues:
    """`values` whose conversion to numbers (after Noise.check) rewrites the marker."""

    def __init__(self, field: str, new: Any, size: int) -> None:
        self.field, self.new, self.size = field, new, size
        self.marker: Noise | None = None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        assert self.marker is not None
        object.__setattr__(self.marker, self.field, self.new)  # frozen, but not to Python
        return np.zeros(self.size, dtype=np.float64)


def test_a_marker_rewritten_after_its_check_does_not_shrink_the_noise(tmp_path: Path) -> None:
    """ATTACK: CentralDP checks the marker (Noise.check, contributors == 1) and only then
    converts its values with np.asarray, which runs the analyst's __array__: it sets
    contributors = 10**12 on the frozen marker (object.__setattr__). The charge is the full
    (epsilon, delta), the noise is sigma / 10**6. Claimed: the noise drawn is the one checked
    and charged (sigma for the marker's epsilon, delta)."""
    lazy = _LazyValues("contributors", 10**12, 2000)
    marker = flame.dp.gaussian(lazy, 1.0, 0.5, 1e-6)
    lazy.marker = marker
    dp = central(tmp_path, epsilon=1.0, delta=1e-5)
    try:
        released, _ = dp.release({"t": marker}, 0)
    except RunFailed:
        return  # refused: fine
    noise = np.asarray(released["t"])
    sigma = gaussian_sigma(1.0, 0.5, 1e-6)
    assert float(noise.std()) > sigma / 2, f"noise std {noise.std():g}, sigma {sigma:g}"


def test_a_marker_rewritten_after_its_check_cannot_refund_the_budget(tmp_path: Path) -> None:
    """ATTACK: the same hook sets epsilon = -5 after the check: the ledger records a spend of
    -5 (five more units for every later analysis), then OpenDP fails on the negative scale.
    Claimed: negative epsilons are refused before anything is charged."""
    lazy = _LazyValues("epsilon", -5.0, 1)
    marker = flame.dp.laplace(lazy, 1.0, 0.5)
    lazy.marker = marker
    with pytest.raises(Exception):  # noqa: B017 - any failure; what matters is the ledger
        central(tmp_path).release({"t": marker}, 0)
    assert all(e["epsilon"] >= 0 for e in entries(tmp_path)), entries(tmp_path)


# --- guards: attacks that did not work ----------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [np.array(EXACT), np.float64(EXACT), [EXACT, 1.0], np.array([[EXACT]])],
    ids=["0-d-array", "numpy-scalar", "list", "2-d"],
)
def test_numpy_shapes_of_values_are_noised_and_typed_as_released(
    tmp_path: Path, values: Any
) -> None:
    released, report = central(tmp_path).release({"t": flame.dp.laplace(values, 1.0, 0.5)}, 0)
    assert report is not None and report.spend.epsilon == 0.5
    out = np.asarray(released["t"], dtype=np.float64)
    assert out.shape == np.asarray(values).shape and EXACT not in out.reshape(-1)
    assert not isinstance(released["t"], Noise)


def test_a_marker_subclass_is_noised_like_a_marker(tmp_path: Path) -> None:
    class Mine(Noise):
        pass

    released, report = central(tmp_path).release(
        {"t": Mine(EXACT, "laplace", 1.0, 0.5)}, 0
    )  # fmt: skip
    assert report is not None and released["t"] != EXACT and isinstance(released["t"], float)


@pytest.mark.parametrize("epsilon", ["0.5", True, None, float("nan"), -0.0])
def test_odd_epsilon_types_in_a_hand_built_marker_are_refused(tmp_path: Path, epsilon: Any) -> None:
    with pytest.raises(RunFailed):
        central(tmp_path).release({"t": Noise(EXACT, "laplace", 1.0, epsilon)}, 0)
    assert entries(tmp_path) == []


def test_non_finite_pooled_values_are_refused_before_any_charge(tmp_path: Path) -> None:
    """A colluding node sends inf/NaN: the pooled value is not finite, refused, not charged."""
    for bad in (float("inf"), float("nan"), [1.0, float("-inf")]):
        with pytest.raises(RunFailed, match="finite"):
            central(tmp_path).release({"t": flame.dp.laplace(bad, 1.0, 0.5)}, 0)
    assert entries(tmp_path) == []


def test_concurrent_releases_never_overspend_one_ledger(tmp_path: Path) -> None:
    """Eight aggregators share one ledger; each asks 0.3 of 1.0: exactly three get it."""
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def one(i: int) -> None:
        dp = CentralDP(
            AggregatorPolicy(epsilon_budget=1.0, ledger_dir=tmp_path),
            node_id="aggregator",
            analysis_id=f"run-{i}",
        )
        barrier.wait(30)
        try:
            dp.release({"t": flame.dp.laplace(EXACT, 1.0, 0.3)}, 0)
            outcomes.append("released")
        except RunFailed:
            outcomes.append("refused")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes).count("released") == 3 and len(outcomes) == 8
    assert len(entries(tmp_path)) == 3


def test_an_unwritable_ledger_fails_closed(tmp_path: Path) -> None:
    folder = tmp_path / "ledger"
    folder.mkdir()
    (folder / "aggregator--aggregate.json").mkdir()  # cannot be read or replaced
    with pytest.raises((RunFailed, FlameError, OSError)) as failed:
        central(folder).release({"t": flame.dp.laplace(EXACT, 1.0, 0.5)}, 0)
    assert not leaks({"error": str(failed.value).encode()})


def test_an_exception_in_converged_sees_only_the_noisy_value(tmp_path: Path) -> None:
    """`converged` gets the released value: even raising it out shows the noisy one."""
    folder = write_study(
        tmp_path / "study",
        '{"t": flame.dp.laplace(total, 1.0, 0.5)}',
        """
        def converged(current, previous):
            raise ValueError(repr(current["t"]))
        """,
    )
    from flame.analysis.loader import load_analysis

    functions = load_analysis(folder / "analysis.py").functions
    assert functions.converged is not None
    with pytest.raises(RunFailed, match="converged failed") as failed:
        flame.simulate(
            functions.analyze,
            functions.aggregate,
            functions.converged,
            data=folder / "data",
            epochs=2,
            aggregator_policy=AggregatorPolicy(epsilon_budget=5.0, ledger_dir=tmp_path / "l"),
        )
    assert not leaks({"error": str(failed.value).encode()})
    assert [e["epoch"] for e in entries(tmp_path / "l")] == [0]


# --- seat 4: restarts ---------------------------------------------------------------------------


class CrashingStore:
    """A run store kept in memory; `crash_at` raises right after (or before) a checkpoint."""

    def __init__(self) -> None:
        self.checkpoint: Checkpoint | None = None
        self.final: RunResult | None = None
        self.crash_before: int | None = None  # next_epoch whose checkpoint is not written
        self.crash_after: int | None = None  # next_epoch written, then the aggregator dies

    def load_final(self) -> RunResult | None:
        return self.final

    def load_checkpoint(self) -> Checkpoint | None:
        return self.checkpoint

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        if checkpoint.next_epoch == self.crash_before:
            self.crash_before = None
            raise RuntimeError("aggregator killed before its checkpoint")
        self.checkpoint = checkpoint
        if checkpoint.next_epoch == self.crash_after:
            self.crash_after = None
            raise RuntimeError("aggregator killed after its checkpoint")

    def save_final(self, result: RunResult) -> str:
        self.final = result
        return "memory"


RESUME = """
seen = []

def remember(previous):
    seen.append(None if previous is None else previous["t"])
"""


def test_a_restart_after_the_charge_counts_again_and_a_resume_reuses_the_checkpointed_draw(
    tmp_path: Path,
) -> None:
    """Killed between charge and checkpoint: the epoch is charged again (twice, never zero).
    Killed after the checkpoint: the resumed run starts from the checkpointed noisy value,
    and no epoch is drawn twice without being charged twice."""
    folder = write_study(
        tmp_path / "study",
        'remember(previous) or {"t": flame.dp.laplace(total, 1.0, 0.25)}',
        RESUME,
    )
    (folder / "analysis.py").write_text(
        (folder / "analysis.py").read_text().replace("def aggregate(results):",
                                                     "def aggregate(results, previous):")
    )  # fmt: skip
    from flame.analysis.loader import load_analysis

    loaded = load_analysis(folder / "analysis.py")
    functions = loaded.functions
    seen: list[Any] = functions.aggregate.__wrapped__.__globals__["seen"]
    ledger = tmp_path / "ledger"
    policy = AggregatorPolicy(epsilon_budget=10.0, ledger_dir=ledger)
    store = CrashingStore()
    store.crash_before = 1  # epoch 0 charged, its checkpoint never written
    with pytest.raises(RunFailed):
        flame.simulate(functions.analyze, functions.aggregate, data=folder / "data", epochs=3,
                       store=store, aggregator_policy=policy)  # fmt: skip
    assert [e["epoch"] for e in entries(ledger)] == [0]
    store.crash_after = 2  # epochs 0, 1 done; checkpoint of epoch 1 written, then killed
    with pytest.raises(RunFailed):
        flame.simulate(functions.analyze, functions.aggregate, data=folder / "data", epochs=3,
                       store=store, aggregator_policy=policy)  # fmt: skip
    assert [e["epoch"] for e in entries(ledger)] == [0, 0, 1]
    assert store.checkpoint is not None and store.checkpoint.next_epoch == 2
    checkpointed = store.checkpoint.previous["t"]
    seen.clear()
    result = flame.simulate(functions.analyze, functions.aggregate, data=folder / "data",
                            epochs=3, store=store, aggregator_policy=policy)  # fmt: skip
    assert seen == [checkpointed], "the resumed epoch must start from the checkpointed draw"
    assert [e["epoch"] for e in entries(ledger)] == [0, 0, 1, 2]
    assert result.value["t"] != EXACT


# --- seat 2 + 3: a refused release in flame run over Mosquitto, read by every node ------------


def test_flame_run_a_dataframe_marker_does_not_reach_the_nodes_exactly(
    mqtt_broker: Any, tmp_path: Path
) -> None:
    """ATTACK (as the first test, in production): the wire error naming repr(Noise) becomes
    the run's abort reason, sent to every node and printed by each. Claimed: the exact value
    is in no node's output."""
    from nodes import Federation, federation_env

    folder = write_study(
        tmp_path / "study",
        '{"table": pd.DataFrame({"total": [flame.dp.laplace(total, 1.0, 0.5)]})}',
        "import pandas as pd",
    )
    nodes = sorted(VALUES)
    policy = tmp_path / "aggregator-policy.toml"
    policy.write_text('epsilon_budget = 5.0\nledger_dir = "ledger"\n')
    env = federation_env(
        mqtt_broker, f"cdp-redteam-{os.getpid()}", nodes, presence_timeout=90, epoch_timeout=90
    )
    federation = Federation(env, folder / "analysis.py", folder / "data", nodes, tmp_path / "run")
    try:
        aggregator = federation.start("aggregator", FLAME_POLICY=str(policy))
        for node in nodes:
            federation.start(node)
        assert aggregator.wait(150) != 0
        for node in nodes:
            federation.processes[node].wait(150)
        texts = {
            f"{name} {stream}": getattr(process, stream)().encode()
            for name, process in federation.processes.items()
            for stream in ("stdout", "stderr")
        }
    finally:
        federation.close()
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes()
    assert not leaks(texts), f"the exact aggregate is in {leaks(texts)}"

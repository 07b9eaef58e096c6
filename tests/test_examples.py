"""Each shipped example, run federated, equals the same statistic computed on pooled data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

import flame
from flame.analysis.loader import load_analysis

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def pooled(example: str) -> dict[str, np.ndarray]:
    """All CSV rows of every node of an example, read with the csv module (not flame)."""
    columns: dict[str, list[float]] = {}
    for path in sorted((EXAMPLES / example / "data").rglob("*.csv")):
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    columns.setdefault(key, []).append(float(value))
    return {key: np.array(values) for key, values in columns.items()}


def run_example(example: str, epochs: int = 1) -> flame.RunResult:
    analysis = load_analysis(EXAMPLES / example)
    f = analysis.functions
    return flame.simulate(
        f.analyze, f.aggregate, f.converged, data=EXAMPLES / example / "data", epochs=epochs
    )


def test_federated_mean_equals_pooled_mean_and_std() -> None:
    result = run_example("federated_mean")
    data = pooled("federated_mean")
    assert set(result.value) == set(data)
    for column, values in data.items():
        assert result.value[column]["n"] == values.size
        assert result.value[column]["mean"] == pytest.approx(values.mean(), abs=1e-9, rel=0)
        assert result.value[column]["std"] == pytest.approx(values.std(ddof=1), abs=1e-9, rel=0)
    assert result.history[0].nodes == ["clinic_a", "clinic_b", "clinic_c"]


def test_federated_histogram_counts_equal_pooled_counts() -> None:
    result = run_example("federated_histogram")
    data = pooled("federated_histogram")
    for column, part in result.value.items():
        edges = np.array(part["edges"])
        expected, _ = np.histogram(data[column], bins=edges)
        assert np.array_equal(part["counts"], expected)
        assert part["under"] == int((data[column] < edges[0]).sum())
        assert part["over"] == int((data[column] > edges[-1]).sum())
        assert int(part["counts"].sum()) + part["under"] + part["over"] == data[column].size


def central_logistic_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Maximum-likelihood fit on pooled rows by iteratively reweighted least squares."""
    beta = np.zeros(x.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-x @ beta))
        w = p * (1.0 - p)
        z = x @ beta + (y - p) / w
        new = np.linalg.lstsq(x * np.sqrt(w)[:, None], z * np.sqrt(w), rcond=None)[0]
        if np.abs(new - beta).max() < 1e-12:
            return new
        beta = new
    return beta


def test_federated_logistic_regression_matches_a_central_fit() -> None:
    result = run_example("federated_logistic_regression", epochs=50)
    data = pooled("federated_logistic_regression")
    columns = [data["age"], data["bmi"], data["systolic_bp"]]
    x = np.column_stack([np.ones(data["outcome"].size), *columns])
    expected = central_logistic_fit(x, data["outcome"])
    assert result.converged
    assert 2 <= result.epochs < 50
    assert np.allclose(result.value["beta"], expected, atol=1e-3, rtol=0)
    assert [record.epoch for record in result.history] == list(range(result.epochs))


def test_secure_mean_matches_the_pooled_statistics_within_precision() -> None:
    analysis = load_analysis(EXAMPLES / "secure_mean")
    f = analysis.functions
    result = flame.simulate(
        f.analyze, f.aggregate, data=EXAMPLES / "secure_mean" / "data", secure=True
    )
    data = pooled("secure_mean")
    assert result.value["contributors"] == ["clinic_a", "clinic_b", "clinic_c"]
    for column, values in data.items():
        assert result.value[column]["n"] == values.size
        assert result.value[column]["mean"] == pytest.approx(values.mean(), abs=1e-6, rel=0)
        assert result.value[column]["std"] == pytest.approx(values.std(ddof=1), abs=1e-5, rel=0)


def test_crosstab_min_count_equals_pooled_table_less_small_cells() -> None:
    example = EXAMPLES / "crosstab_min_count"
    f = load_analysis(example).functions
    policy = flame.load_policy(example / "policy.toml")
    result = flame.simulate(f.analyze, f.aggregate, data=example / "data", policy=policy).value
    expected = np.zeros((2, 3), dtype=np.int64)
    hidden = {}
    for folder in sorted((example / "data").iterdir()):
        with (folder / "patients.csv").open(newline="") as handle:
            rows = [(int(r["sex"]), float(r["age"])) for r in csv.DictReader(handle)]
        table = np.zeros((2, 3), dtype=np.int64)
        for sex, age in rows:
            table[sex, 0 if age < 40 else 1 if age < 65 else 2] += 1
        small = (table > 0) & (table < 5)
        hidden[folder.name] = int(small.sum())
        expected += np.where(small, 0, table)
    assert np.array_equal(result["table"], expected)
    assert result["suppressed_cells"] == hidden == {"clinic_a": 0, "clinic_b": 1, "clinic_c": 0}


def test_dp_mean_is_near_the_pooled_mean(tmp_path: Path) -> None:
    example = EXAMPLES / "dp_mean"
    f = load_analysis(example).functions
    policy = flame.load_policy(example / "policy.toml").model_copy(update={"ledger_dir": tmp_path})
    result = flame.simulate(f.analyze, f.aggregate, data=example / "data", policy=policy).value
    ages = pooled("dp_mean")["age"]
    # three nodes' Laplace(200) on sums of ~10 000 and Laplace(2) on counts: sd ~2.5 years
    assert abs(result["mean"] - ages.mean()) < 15
    assert abs(result["n"] - ages.size) < 30

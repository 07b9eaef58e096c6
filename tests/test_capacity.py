"""Start-up refuses a results folder that cannot take the run's writes (flame.ops.capacity)."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from flame.config import FlameConfig
from flame.ops import capacity
from flame.ops.capacity import capacity_problem
from flame.ops.check import preflight

Usage = namedtuple("Usage", "total used free")
MiB = 1024 * 1024


def _config(folder: Path, min_free_mb: float) -> FlameConfig:
    return FlameConfig(
        node_id="aggregator",
        role="aggregation",
        storage={"results_dir": folder, "min_free_mb": min_free_mb},
    )


def test_a_full_disk_fails_the_preflight_naming_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capacity.shutil, "disk_usage", lambda path: Usage(10 * MiB, 9 * MiB, MiB))
    failed = preflight(_config(tmp_path / "results", 64))
    assert len(failed) == 1
    line = failed[0].line()
    assert str(tmp_path / "results") in line
    assert "only 1 MiB free, the run needs 64 MiB" in line
    assert "MIN_FREE_MB" in line


def test_enough_space_passes_and_leaves_nothing_behind(tmp_path: Path) -> None:
    assert preflight(_config(tmp_path, 1)) == []
    assert list(tmp_path.iterdir()) == []  # the reservation is removed


def test_the_real_filesystem_refuses_more_than_it_has(tmp_path: Path) -> None:
    too_much = shutil.disk_usage(tmp_path).free + 1024 * MiB
    assert "free, the run needs" in str(capacity_problem(tmp_path, too_much))


def test_a_reservation_the_filesystem_cannot_take_is_refused_even_if_df_says_yes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quotas and reserved blocks: free space looks fine, the write would not be."""
    real_free = shutil.disk_usage(tmp_path).free
    monkeypatch.setattr(capacity.shutil, "disk_usage", lambda path: Usage(2**60, 0, 2**60))
    problem = capacity_problem(tmp_path, real_free + 1024 * MiB)
    assert problem is not None and "cannot take a write" in problem, problem
    assert list(tmp_path.iterdir()) == []

"""`flame check`'s installation items (issue 20): runtime code the node user can write, and a
kernel without Landlock, are FAIL with how to fix them."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

import flame
from flame.ops import check_install


def test_the_import_path_includes_flame_and_site_packages() -> None:
    roots = check_install.import_path()
    assert Path(flame.__file__).resolve().parent in roots


def test_writable_runtime_code_fails_naming_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site" / "flame"
    package.mkdir(parents=True)
    (package / "csv_columns.py").write_text("# installed\n")
    monkeypatch.setattr(check_install, "import_path", lambda: [tmp_path / "site"])
    items = check_install.install_checks(SimpleNamespace(role="analysis"))
    runtime = next(item for item in items if item.name == "runtime code")
    assert runtime.verdict == "FAIL"
    assert str(tmp_path / "site") in runtime.detail
    assert "unprivileged user" in runtime.line()


def test_read_only_runtime_code_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check_install, "writable_code", lambda roots: ([], 0))
    items = check_install.install_checks(SimpleNamespace(role="analysis"))
    assert next(i for i in items if i.name == "runtime code").verdict == "ok"


def test_no_landlock_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check_install, "writable_code", lambda roots: ([], 0))
    monkeypatch.setattr(check_install, "landlock_abi", lambda: 0)
    items = check_install.install_checks(SimpleNamespace(role="analysis"))
    sandbox = next(i for i in items if i.name == "analysis sandbox")
    assert sandbox.verdict == "FAIL" and "Landlock is unavailable" in sandbox.detail


def test_this_machine_reports_what_it_has() -> None:
    items = {i.name: i for i in check_install.install_checks(SimpleNamespace(role="analysis"))}
    if check_install.landlock_abi() >= 1:
        assert items["analysis sandbox"].verdict == "ok"
    if os.geteuid() == 0:  # root may write every installed file
        assert items["runtime code"].verdict == "FAIL"


def test_aggregator_nodes_get_no_installation_items() -> None:
    assert check_install.install_checks(SimpleNamespace(role="aggregation")) == []

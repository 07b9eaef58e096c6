"""The lazy public API: `flame --version`/`--help` load no heavy modules, names still resolve."""

from __future__ import annotations

import json
import subprocess
import sys

import flame


def _modules_after(code: str) -> set[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_version_and_help_load_neither_pydantic_nor_numpy() -> None:
    loaded = _modules_after(
        "from flame.cli import main\n"
        "for argv in (['--version'], ['--help'], ['simulate', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass"
    )
    assert "flame.cli" in loaded
    heavy = {"pydantic", "pydantic_settings", "numpy", "httpx", "minio", "paho", "gmpy2"}
    assert not heavy & loaded, sorted(heavy & loaded)


def test_simulation_loads_no_network_client() -> None:
    loaded = _modules_after("import flame\nflame.simulate\nimport flame.testing")
    assert "flame.simulate" in loaded and "numpy" in loaded
    assert not {"httpx", "minio", "paho", "gmpy2", "phe"} & loaded


def test_every_public_name_resolves_and_is_what_it_was() -> None:
    for name in flame.__all__:
        assert getattr(flame, name) is not None, name
    from flame import RunResult, secure, simulate
    from flame.federated.records import RunResult as Record
    from flame.federated.secure import secure as mark

    assert RunResult is Record and secure is mark and callable(simulate)
    assert set(flame.__all__) <= set(dir(flame))


def test_flame_simulate_stays_the_function_after_the_submodule_is_imported() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import flame.simulate, flame.testing, flame\n"
            "from flame.simulate import DataSpec\n"
            "print(type(flame.simulate).__name__, flame.simulate.__module__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["function", "flame.simulate"]


def test_unknown_attribute_is_an_attribute_error() -> None:
    try:
        flame.no_such_thing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")

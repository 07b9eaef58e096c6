"""`flame init --example X` prints the command that actually runs X.

Most examples read a data folder (`--data`); `omop_measurements` reads each node's OMOP
database, described in its `nodes.toml`, and needs `--nodes` (plus its database setup).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
from servers.postgres import PostgresServer

from flame.cli import main
from flame.ops import scaffold


def _init(tmp_path: Path, example: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    target = tmp_path / example
    assert main(["init", str(target), "--example", example]) == 0
    return [line[len("next: ") :] for line in capsys.readouterr().err.splitlines() if
            line.startswith("next: ")]  # fmt: skip


@pytest.mark.parametrize("example", scaffold.examples())
def test_the_printed_command_names_the_inputs_the_example_has(
    tmp_path: Path, example: str, capsys: pytest.CaptureFixture[str]
) -> None:
    steps = _init(tmp_path, example, capsys)
    simulate = shlex.split(steps[-1])
    assert simulate[:3] == ["flame", "simulate", str(tmp_path / example)]
    option, path = simulate[3:]
    if (tmp_path / example / "nodes.toml").is_file():
        assert (option, path) == ("--nodes", str(tmp_path / example / "nodes.toml"))
    else:
        assert option == "--data" and Path(path).is_dir()
        assert len(steps) == 1


def test_the_printed_omop_commands_run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    postgres_server: PostgresServer,
    postgres_databases: Callable[[], str],
) -> None:
    """Run what init printed, verbatim, against real PostgreSQL databases. The setup step is
    done here under fresh database names (the shared server may hold the example's own),
    which nodes.toml is pointed at; the simulate command is run exactly as printed."""
    steps = _init(tmp_path, "omop_measurements", capsys)
    root = tmp_path / "omop_measurements"
    assert steps[0] == f"python {root / 'create_databases.py'}"
    nodes = root / "nodes.toml"
    text = nodes.read_text()
    for node in ("clinic_a", "clinic_b", "clinic_c"):
        database = postgres_databases()
        postgres_server.execute(database, (root / "data" / f"{node}.sql").read_text())
        text = re.sub(rf"postgresql://\S+/flame_omop_{node}\b", postgres_server.url(database), text)
    nodes.write_text(text)
    assert main([*shlex.split(steps[-1])[1:], "--quiet"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"male", "female"}, result
    assert result["male"]["n"] > 0

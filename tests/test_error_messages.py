"""Each documented user error, triggered as a user would (the `flame` command, `python -`, the
Python API, a real PostgreSQL): its message names the setting or command that fixes it, and a
failure is printed once on the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from servers.postgres import PostgresServer

from flame.data import Data, LocalSource
from flame.data.sources.sql import SqlSource
from flame.errors import DataError

TIMEOUT = 120


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FLAME_")}
    env.update(extra)
    return env


def flame(*args: str | Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flame", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=clean_env(**env),
        cwd=cwd,
        check=False,
    )


def error_line(run: subprocess.CompletedProcess[str]) -> str:
    """The run failed, and stderr has exactly one `flame:` line: that line."""
    assert run.returncode != 0, run
    found = [line for line in run.stderr.splitlines() if line.startswith("flame:")]
    assert len(found) == 1, run.stderr
    return found[0]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """Two nodes with a CSV file each (ages 30..50 and 31..41)."""
    for node, rows in {"a": [(30, "m"), (40, "f"), (50, "m")], "b": [(31, "m"), (41, "f")]}.items():
        folder = tmp_path / "data" / node
        folder.mkdir(parents=True)
        lines = ["age,sex", *(f"{age},{sex}" for age, sex in rows)]
        (folder / "people.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def analysis(folder: Path, analyze_body: str, *, head: str = "") -> Path:
    path = folder / "analysis.py"
    path.write_text(
        "import flame\nimport numpy as np\n"
        + textwrap.dedent(head)
        + "\n\ndef analyze(data, epoch, previous):\n"
        + textwrap.indent(textwrap.dedent(analyze_body).strip(), "    ")
        + "\n\n\ndef aggregate(results, epoch, previous):\n    return len(results)\n"
    )
    return path


# 1 ---------------------------------------------------------------------------------------------
def test_sql_sources_take_the_question_marks_data_sql_takes(
    project: Path, postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    db = postgres_databases()
    postgres_server.execute(
        db,
        "create table people (age int, sex text, note text);"
        "insert into people values (30, 'm', 'a?b'), (40, 'f', '50%'), (50, 'm', 'x')",
    )
    source = SqlSource("db", postgres_server.url(db))
    local = Data({"local": LocalSource(project / "data" / "a")}, node_id="a")
    try:
        query = "select count(*) as n from people where age > ? and sex = ?"
        assert local.sql(query, [35, "m"]).column("n").to_pylist() == [1]
        assert source.query(query, [35, "m"]).column("n").to_pylist() == [1]
        # a `?` and a `%` inside literals are text, not placeholders
        tricky = "select note from people where note <> '?' and note not like '%z%' and age = ?"
        assert source.query(tricky, [40]).column("note").to_pylist() == ["50%"]
        assert source.query("select age from people where age = %s", [50]).num_rows == 1
        with pytest.raises(DataError) as wrong_count:
            source.query("select age from people where age = ?", [30, 40])
        assert "`?` placeholders" in str(wrong_count.value)
        assert "%s" in str(wrong_count.value)
        with pytest.raises(DataError) as psycopg_style:
            local.sql("select age from people where age > %s", [1])
        assert "data.sql takes `?` placeholders" in str(psycopg_style.value)
    finally:
        source.close()
        local.close()


# 2 ---------------------------------------------------------------------------------------------
def test_a_missing_column_names_the_columns_there_are(project: Path) -> None:
    path = analysis(project, 'return float(data.read_csv()["ages"].sum())')
    line = error_line(flame("simulate", path, "--data", "data", "--quiet", cwd=project))
    assert "'ages'" in line and "did you mean 'age'?" in line, line
    assert "'age', 'sex'" in line, line
    assert "30" not in line and "'m'" not in line, line  # names only, never values
    path = analysis(project, 'return flame.dp.count("ages", epsilon=0.5)')  # the node reads it
    line = error_line(flame("simulate", path, "--data", "data", "--quiet", cwd=project))
    assert "did you mean 'age'?" in line and "'age', 'sex'" in line, line


# 3 ---------------------------------------------------------------------------------------------
def test_a_missing_run_parameter_says_how_to_pass_it(project: Path) -> None:
    path = analysis(project, 'return len(flame.context().params["column"])')
    line = error_line(flame("simulate", path, "--data", "data", "--quiet", cwd=project))
    assert "'column' was not given" in line, line
    assert "--param column=" in line and "FLAME_PARAMS" in line, line
    given = flame(
        "simulate", path, "--data", "data", "--quiet", "--param", "column=age", cwd=project
    )
    assert given.returncode == 0, given.stderr


# 4 ---------------------------------------------------------------------------------------------
def test_a_misspelt_setting_gets_did_you_mean(project: Path) -> None:
    path = analysis(project, "return 1")
    (project / "policy.toml").write_text("min_row = 3\n")
    line = error_line(
        flame("simulate", path, "--data", "data", "--quiet", "--policy", "policy.toml", cwd=project)
    )
    assert "policy.toml" in line and "min_row" in line, line
    assert "did you mean 'min_rows'?" in line, line
    (project / "flame.toml").write_text("[secure]\nmin_contributor = 2\n")
    line = error_line(
        flame("simulate", path, "--data", "data", "--quiet", cwd=project, FLAME_CONFIG="flame.toml")
    )
    assert "FLAME_SECURE__MIN_CONTRIBUTOR" in line, line
    assert "did you mean 'min_contributors'?" in line, line


# 5 ---------------------------------------------------------------------------------------------
def test_a_text_array_says_what_can_be_sent(project: Path) -> None:
    path = analysis(project, 'return np.array(["a", "b"])')
    line = error_line(flame("simulate", path, "--data", "data", "--quiet", cwd=project))
    assert "<U1" in line, line
    assert ".tolist()" in line and "What can be sent: dicts, lists" in line, line


# 6 ---------------------------------------------------------------------------------------------
def test_dp_bounds_without_any_policy_says_how_to_give_one(project: Path) -> None:
    path = analysis(project, 'return flame.dp.sum("age", epsilon=0.5)')
    line = error_line(flame("simulate", path, "--data", "data", "--quiet", cwd=project))
    assert "no node policy was given" in line, line
    assert "--policy FILE" in line and "FLAME_POLICY" in line, line
    assert "[dp_bounds] age = [lower, upper]" in line, line


# 7 ---------------------------------------------------------------------------------------------
def test_isolate_on_code_from_stdin_says_to_use_a_file(project: Path) -> None:
    script = textwrap.dedent(
        """
        import flame
        def analyze(data, epoch, previous):
            return 1
        def aggregate(results, epoch, previous):
            return sum(results.values())
        flame.simulate(analyze, aggregate, data="data", isolate=True)
        """
    )
    run = subprocess.run(
        [sys.executable, "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=clean_env(),
        cwd=project,
        check=False,
    )
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert "cannot import <stdin>" not in run.stderr, run.stderr
    assert "<stdin>" in last and "save the analysis as a .py file" in last, last
    assert "isolate=False" in last, last


# 8 ---------------------------------------------------------------------------------------------
def test_an_exhausted_simulated_budget_names_the_ledger_to_delete(project: Path) -> None:
    path = analysis(
        project,
        'return flame.dp.count("age", epsilon=1.0)',
        head="@flame.dp.spends(epsilon=1.0)",
    )
    (project / "policy.toml").write_text('epsilon_budget = 1.0\nledger_dir = "spent"\n')
    args = ("simulate", path, "--data", "data", "--quiet", "--policy", "policy.toml")
    first = flame(*args, cwd=project)
    assert first.returncode == 0, first.stderr
    line = error_line(flame(*args, cwd=project))
    assert "rule: epsilon_budget" in line, line
    assert "delete that folder" in line and str((project / "spent").resolve()) in line, line


# 9 ---------------------------------------------------------------------------------------------
def test_too_few_contributors_names_the_variable(project: Path) -> None:
    path = analysis(project, "return {'n': flame.secure(1.0)}")
    run = flame(
        "simulate", path, "--data", "data", "--quiet", "--secure",
        cwd=project, FLAME_SECURE__MIN_CONTRIBUTORS="3",
    )  # fmt: skip
    line = error_line(run)
    assert "at least 3" in line and "FLAME_SECURE__MIN_CONTRIBUTORS" in line, line


# 10 --------------------------------------------------------------------------------------------
def test_a_failure_is_printed_once_and_json_logs_keep_their_line(project: Path) -> None:
    path = analysis(project, 'raise ValueError("negative " + "doses")')  # frames show the code
    run = flame("simulate", path, "--data", "data", "--quiet", cwd=project)
    error_line(run)
    assert run.stderr.count("negative doses") == 1, run.stderr
    assert "ERROR" not in run.stderr, run.stderr
    assert run.stderr.count("Traceback (most recent call last)") == 1, run.stderr  # the frames

    as_json = flame(
        "simulate", path, "--data", "data", "--quiet", cwd=project, FLAME_LOG_FORMAT="json"
    )
    error_line(as_json)
    records = [json.loads(x) for x in as_json.stderr.splitlines() if x.startswith("{")]
    failures = [r for r in records if r["level"] == "ERROR"]
    assert len(failures) == 1, as_json.stderr
    assert "negative doses" in failures[0]["message"]
    assert failures[0]["epoch"] == 0

"""Red team: hostile analysis code against the node's SQL source (issue 13), on a real
PostgreSQL, through the isolated child as on a node.

The source promises read-only queries. The attacker is the analysis: it cannot write, but it
runs SQL with the node's database role, and whatever the role may read leaves in the result.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from servers.postgres import PostgresServer

import flame
from flame.analysis.loader import load_analysis
from flame.data import Data
from flame.data.sources.sql import SqlSource
from flame.errors import RunFailed

SERVER_FILE = """
def analyze(data):
    table = data.source("db").query("select pg_read_file('/etc/passwd') as f")
    return {"f": table.column("f")[0].as_py()}

def aggregate(results):
    return results
"""

WRITE_IN_A_FUNCTION = """
def analyze(data):
    db = data.source("db")
    db.query("select set_config('default_transaction_read_only', 'off', false)")
    db.query("create table pwned (x int)")
    return {"ok": True}

def aggregate(results):
    return results
"""


def _run(tmp_path: Path, source: str, url: str) -> object:
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(source))
    functions = load_analysis(path).functions
    nodes = {"node-0": Data({"db": SqlSource("db", url)}, node_id="node-0")}
    return flame.simulate(functions.analyze, functions.aggregate, data=nodes, isolate=True)


def test_the_read_only_transaction_cannot_be_switched_off(
    tmp_path: Path, postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    database = postgres_databases()
    with pytest.raises(RunFailed, match="read-only"):
        _run(tmp_path, WRITE_IN_A_FUNCTION, postgres_server.url(database))
    with postgres_server.admin(database) as conn:
        found = conn.execute("select to_regclass('public.pwned')").fetchone()
    assert found is not None and found[0] is None


def test_a_superuser_source_does_not_hand_server_files_to_the_analysis(
    tmp_path: Path, postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    database = postgres_databases()
    with pytest.raises(RunFailed, match=r"'db'.*role 'postgres'.*superuser.*only SELECT") as err:
        _run(tmp_path, SERVER_FILE, postgres_server.superuser_url(database))
    assert "root:" not in str(err.value)


def test_the_databases_select_only_role_cannot_read_server_files_either(
    tmp_path: Path, postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    with pytest.raises(RunFailed, match="permission denied") as err:
        _run(tmp_path, SERVER_FILE, postgres_server.url(postgres_databases()))
    assert "root:" not in str(err.value)

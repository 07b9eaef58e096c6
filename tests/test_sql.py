"""SQL sources against a real PostgreSQL: federated = pooled, read-only, timeouts, credentials,
and `flame simulate --nodes` with a FHIR node and a SQL node in one run."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
from servers.fhir_server import LOINC_WEIGHT, DataApiServer, observation_value
from servers.postgres import PostgresServer

import flame
from flame.analysis.loader import load_analysis
from flame.cli import main
from flame.data import Data
from flame.data.sources.sql import SqlSource
from flame.errors import DataError, FlameError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "omop_measurements"
NODES = ("clinic_a", "clinic_b", "clinic_c")


def load_omop(server: PostgresServer, make: Callable[[], str]) -> dict[str, str]:
    """One database per node from the example's SQL files; node -> database name."""
    databases = {}
    for node in NODES:
        name = make()
        server.execute(name, (EXAMPLE / "data" / f"{node}.sql").read_text())
        databases[node] = name
    return databases


def pooled_sql(server: PostgresServer, databases: dict[str, str], make: Callable[[], str]) -> dict:
    """The same statistic from one SQL query over every node's rows copied into one database."""
    pooled = make()
    for node in NODES:
        server.execute(
            pooled,
            (EXAMPLE / "data" / f"{node}.sql")
            .read_text()
            .replace("create table", "create table if not exists"),
        )
    with server.admin(pooled) as conn:
        rows = conn.execute(
            "select p.gender_concept_id, count(m.value_as_number), avg(m.value_as_number)::float8,"
            " stddev_samp(m.value_as_number)::float8 from measurement m join person p using "
            "(person_id) where m.measurement_concept_id = 3004249 group by 1 order by 1"
        ).fetchall()
    names = {8507: "male", 8532: "female"}
    return {names[g]: {"n": n, "mean": mean, "std": std} for g, n, mean, std in rows}


def test_federated_mean_over_three_databases_equals_pooled_sql(
    postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    databases = load_omop(postgres_server, postgres_databases)
    nodes = {
        node: Data({"omop": SqlSource("omop", postgres_server.url(db))}, node_id=node)
        for node, db in databases.items()
    }
    analysis = load_analysis(EXAMPLE)
    f = analysis.functions
    result = flame.simulate(f.analyze, f.aggregate, data=nodes)
    expected = pooled_sql(postgres_server, databases, postgres_databases)
    assert set(result.value) == {"male", "female"}
    for gender, stats in expected.items():
        assert result.value[gender]["n"] == stats["n"]
        assert result.value[gender]["mean"] == pytest.approx(stats["mean"], rel=1e-12)
        assert result.value[gender]["std"] == pytest.approx(stats["std"], rel=1e-9)


def test_query_streams_batches_with_types_and_nulls(
    postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    db = postgres_databases()
    postgres_server.execute(
        db,
        "create table t (i int, x numeric, s text, d date);"
        "insert into t select g, case when g % 10 = 0 then null else g / 4.0 end, 'r' || g,"
        " date '2024-01-01' + g from generate_series(1, 1000) g",
    )
    source = SqlSource("db", postgres_server.url(db), batch_rows=128)
    batches = list(source.batches("select * from t where i > %s order by i", [0]))
    assert len(batches) == 8 and sum(b.num_rows for b in batches) == 1000
    table = source.query("select * from t order by i")
    assert table.schema.types == [pa.int32(), pa.float64(), pa.string(), pa.date32()]
    assert table.column("x").null_count == 100
    assert table.column("x")[1].as_py() == 0.5
    assert source.query("select * from t where i < 0").num_rows == 0
    frame = source.to_pandas("select count(*) as n from t")
    assert int(frame["n"][0]) == 1000
    source.close()


def test_a_write_is_refused_by_the_read_only_transaction(
    postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    db = postgres_databases()
    postgres_server.execute(
        db,
        "create table t (i int); insert into t values (1); create sequence s; "
        f'grant all on t, s to "{postgres_server.reader(db)}"',  # it may write: not the guard
    )
    source = SqlSource("omop", postgres_server.url(db))
    for statement in ("insert into t values (2)", "delete from t", "create table u (i int)"):
        with pytest.raises(DataError, match=r"'omop'.*read-only"):
            source.query(statement)
    with pytest.raises(DataError, match="read-only"):  # a write hidden in a SELECT
        source.query("select nextval('s')")
    with pytest.raises(DataError, match="multiple commands"):  # no escaping the transaction
        source.query("commit; set default_transaction_read_only = off; insert into t values (3)")
    with pytest.raises(DataError, match="before any query"):  # nor switching it off
        source.query("set transaction read write")
    assert source.query("select count(*) as n from t").column("n")[0].as_py() == 1


def test_a_slow_query_hits_the_statement_timeout(
    postgres_server: PostgresServer, postgres_databases: Callable[[], str]
) -> None:
    source = SqlSource("omop", postgres_server.url(postgres_databases()), statement_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(DataError, match=r"'omop'.*statement timeout of 0.3 s"):
        source.query("select pg_sleep(10)")
    assert time.monotonic() - started < 8
    assert source.query("select 1 as ok").num_rows == 1  # the source is usable afterwards


def test_bad_credentials_name_the_source_never_the_password(
    postgres_server: PostgresServer,
) -> None:
    secret = "hunter2-very-secret"
    url = postgres_server.url("postgres", user="no_such_role_x", password=secret)
    source = SqlSource("omop", url)
    with pytest.raises(FlameError) as caught:
        source.probe()
    message = str(caught.value)
    assert "omop" in message and secret not in message and url not in message
    with pytest.raises(DataError, match="postgresql://"):
        SqlSource("omop", "mysql://x")


def test_simulate_nodes_file_with_a_fhir_node_and_a_sql_node(
    postgres_server: PostgresServer,
    postgres_databases: Callable[[], str],
    data_api: DataApiServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = postgres_databases()
    postgres_server.execute(
        db, "create table weights (kg numeric); insert into weights values (70), (80), (null)"
    )
    (tmp_path / "analysis.py").write_text(
        "import flame\n"
        "def analyze(data):\n"
        "    unit = flame.context().params['unit']\n"
        "    if 'fhir' in data.sources:\n"
        f"        t = data.source('fhir').table('Observation', {{'v': 'valueQuantity.value'}},"
        f" {{'code': '{LOINC_WEIGHT}'}})\n"
        "        values = [float(v) for v in t['v'] if v == v]\n"
        "    else:\n"
        "        t = data.source('omop').query('select kg from weights where kg is not null')\n"
        "        values = t.column('kg').to_pylist()\n"
        "    return {'n': len(values), 'sum': sum(values), 'unit': unit}\n"
        "def aggregate(results):\n"
        "    n = sum(r['n'] for r in results.values())\n"
        "    return {'n': n, 'mean': sum(r['sum'] for r in results.values()) / n,\n"
        "            'units': sorted({r['unit'] for r in results.values()})}\n"
    )
    (tmp_path / "nodes.toml").write_text(
        "[[nodes.hospital_fhir.sources]]\n"
        f'name = "fhir"\nkind = "fhir"\nurl = "{data_api.url}/fhir"\n'
        f'token = "{data_api.token}"\n'
        "[[nodes.hospital_sql.sources]]\n"
        f'name = "omop"\nkind = "sql"\nurl = "{postgres_server.url(db)}"\n'
    )
    code = main(
        ["simulate", str(tmp_path / "analysis.py"), "--nodes", str(tmp_path / "nodes.toml"),
         "--param", "unit=kg", "--quiet"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    fhir_values = [
        v for i, o in enumerate(data_api.resources["Observation"])
        if i % 3 and (v := observation_value(i)) is not None and o["resourceType"] == "Observation"
    ]  # fmt: skip
    pooled = [*fhir_values, 70.0, 80.0]
    assert result["units"] == ["kg"]
    assert result["n"] == len(pooled)
    assert result["mean"] == pytest.approx(sum(pooled) / len(pooled), rel=1e-12)


def test_nodes_file_errors_name_the_node_and_the_setting(tmp_path: Path) -> None:
    from flame.errors import ConfigError
    from flame.ops.nodes_file import load_nodes

    nodes = tmp_path / "nodes.toml"
    nodes.write_text('[[nodes.a.sources]]\nkind = "sql"\nurl = "postgresql://x/y"\nbogus = 1\n')
    with pytest.raises(ConfigError, match=r"node 'a' source 1: bogus: is not a known setting"):
        load_nodes(nodes)
    nodes.write_text('[nodes.a]\nfolder = "x"\n')
    with pytest.raises(ConfigError, match="node 'a' needs"):
        load_nodes(nodes)


def test_a_privileged_role_is_refused_unless_the_source_opts_in(
    postgres_server: PostgresServer,
    postgres_databases: Callable[[], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from flame.config import DataSourceSettings

    db = postgres_databases()
    with pytest.raises(DataError) as caught:
        SqlSource("omop", postgres_server.superuser_url(db)).query("select 1 as ok")
    message = str(caught.value)
    assert "'omop'" in message and "role 'postgres'" in message and "superuser" in message
    assert "only SELECT" in message and "allow_privileged_role" in message
    # a member of pg_read_server_files is refused too, and the password is not in the message
    reader = postgres_server.reader(db)
    postgres_server.execute(db, f'grant pg_read_server_files to "{reader}"')
    url = postgres_server.url(db)
    with pytest.raises(DataError, match=r"role '.*_r'.*\(pg_read_server_files\)") as caught:
        SqlSource("omop", url).probe()
    assert url.split(":")[2].split("@")[0] not in str(caught.value)  # the password
    postgres_server.execute(db, f'revoke pg_read_server_files from "{reader}"')
    assert SqlSource("omop", url).query("select 1 as ok").num_rows == 1
    # the explicit opt-in from config connects, with a warning in the log
    settings = DataSourceSettings(
        name="omop", kind="sql", url=postgres_server.superuser_url(db), allow_privileged_role=True
    )
    with caplog.at_level("WARNING", logger="flame.data.sources.sql"):
        source = SqlSource.from_settings(settings)
        assert source.query("select 1 as ok").num_rows == 1
    assert any("allow_privileged_role" in r.getMessage() for r in caplog.records)
    source.close()

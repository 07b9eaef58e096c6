"""The data layer against its baselines, in one run on the same files.

    python benchmarks/data.py [--quick] [--pg URL] [--repeats N] [--only csv|duckdb|sql]

* CSV: `data.read_csv()` on 1,000,000 rows x 4 columns versus `pyarrow.csv.read_csv` on the
  same file. Each read runs in a fresh child process; the time is the read alone and the peak
  RSS is the process's peak during the read (the peak is reset after the imports through
  /proc/self/clear_refs) above its RSS after the imports: what reading costs.
  Targets: time <= 1.5x pyarrow, peak RSS <= 3x the file size.
  The same read by an analysis in its isolated child (`ChildRunner`, data folder hidden by
  Landlock, the file passed as a read-only descriptor), timed as the whole epoch.
* DuckDB: the mean of one column of a 200 MB CSV through `data.sql(...)`, in a child process
  (wall time of the query, peak RSS of the whole process), next to the in-memory baseline
  `pyarrow.csv.read_csv` + `pyarrow.compute.mean`. Targets: <= 5 s and <= 1 GB.
* SQL: 1,000,000 rows (int8, float8, numeric, text) from PostgreSQL into Arrow through
  `SqlSource.query` (server-side cursor, batches) versus psycopg's own `fetchall` into
  `pyarrow.table`. Target: throughput >= 0.7x psycopg. Needs a PostgreSQL (--pg, default
  postgresql://postgres@127.0.0.1:5432) whose user may create roles and databases: both paths
  read as a scratch login role that is no superuser and may only SELECT the table (SqlSource
  refuses privileged roles); the scratch database and role are dropped afterwards. Without
  an answering PostgreSQL the row is skipped with the reason.

`--quick` shrinks everything tenfold (for a smoke run; the targets are for the full sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

CHILD = r"""
import json, resource, sys, time
mode, path, here = sys.argv[1], sys.argv[2], sys.argv[3]
def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0
def rss_kb():
    return status_kb("VmRSS")
def reset_peak():  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
import numpy, pyarrow, pyarrow.csv, pyarrow.compute
import flame.data, flame.data.readers
if mode == "sql":
    import duckdb, flame.data.sources.duckdb
if mode == "isolated":  # analyze in its Landlock-confined child, data folder hidden
    sys.path.insert(0, here)
    from data import isolated_reader
    runner = isolated_reader(path)
base = rss_kb()
exact = reset_peak()
start = time.perf_counter()
if mode == "isolated":
    rows = runner.run(0, None).result
elif mode == "flame":
    columns = flame.data.Data.from_path(path).read_csv("big.csv")
    rows = len(next(iter(columns.values())))
elif mode == "pyarrow":
    rows = pyarrow.csv.read_csv(path + "/big.csv").num_rows
elif mode == "sql":
    data = flame.data.Data.from_path(path)
    rows = data.sql("select avg(age) as mean, count(age) as n from huge").to_pylist()[0]
elif mode == "pyarrow_mean":
    table = pyarrow.csv.read_csv(path + "/huge.csv")
    rows = {"mean": pyarrow.compute.mean(table.column("age")).as_py()}
seconds = time.perf_counter() - start
if mode == "isolated":
    runner.close()
peak = status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_kb": peak, "base_kb": base, "rows": rows}))
"""


READ_BIG = (  # the modules are imported when the child loads the analysis, before timing
    "import pyarrow.csv, flame.data.csv_columns, flame.data.sources.descriptor\n"
    "def analyze(data):\n    c = data.read_csv('big.csv')\n"
    "    return len(next(iter(c.values())))\n"
    "def aggregate(results):\n    return results\n"
)


def isolated_runner(folder: str | Path, code: str) -> Any:
    """`code`'s analyze in its isolated child, started: the folder hidden by Landlock, its
    files passed as read-only descriptors. `.run(epoch, None)` is one epoch."""
    from flame.analysis.loader import load_analysis
    from flame.data import Data
    from flame.isolation.runner import ChildRunner
    from flame.node.context import Context
    from flame.node.mailbox import Mailbox
    from flame.transport.memory import MemoryBroker, MemoryTransport

    path = Path(tempfile.mkdtemp()) / "iso_read.py"
    path.write_text(code)
    context = Context(
        analysis_id="bench",
        node_id="n",
        role="analysis",
        participants=["n"],
        aggregator_id="aggregator",
        seed=1,
        mailbox=Mailbox(MemoryTransport(MemoryBroker(), "bench", "n")),
    )
    analyze = load_analysis(path).functions.analyze
    runner = ChildRunner(analyze, Data.from_path(folder, "n"), context, hide=[folder])
    runner.start()
    return runner


def isolated_reader(folder: str | Path) -> Any:
    """The isolated child whose epoch reads big.csv; `.run(0, None).result` is its rows."""
    return isolated_runner(folder, READ_BIG)


def _proc_children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def _nspids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(p) for p in line.split()[1:]]
    return [pid]


def reading_process(runner: Any) -> tuple[int | None, str]:
    """The pid (in our namespace) of the process that runs a started runner's `analyze`, or
    None and why not. `runner._process.pid` is not it: a spawned child (`_boot`) forks the
    analysis as PID 1 of a new PID namespace and only waits for it; a fork server's child has
    a pid of the server's namespace. So: the leaf below a spawned child, or the leaf among
    our descendants whose inner pid is the forked child's."""
    process = runner._process
    try:
        if isinstance(process, subprocess.Popen):
            pid = process.pid
            while children := _proc_children(pid):
                if len(children) != 1:
                    return None, f"pid {pid} has {len(children)} children, expected one"
                pid = children[0]
            return pid, ""
        found, todo = [], _proc_children(os.getpid())
        while todo:
            pid = todo.pop()
            children = _proc_children(pid)
            todo += children
            if not children and process.pid in _nspids(pid)[1:]:
                found.append(pid)
        if len(found) == 1:
            return found[0], ""
        return None, f"{len(found)} processes match the fork server's pid {process.pid}"
    except (OSError, ValueError) as exc:  # no /proc, or no task/children (kernel config)
        return None, f"/proc walk failed: {type(exc).__name__}: {exc}"


def child(script: str, mode: str, folder: Path, timeout: float = 600) -> dict[str, Any]:
    """`script` in a fresh interpreter (argv: mode, folder, this folder); its last JSON line."""
    out = subprocess.run(
        [sys.executable, "-c", script, mode, str(folder), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def write_csv(path: Path, rows: int, seed: int = 0) -> None:
    """age (int, a few NA), weight and height (2 decimals), smoker (0/1): a clinic's export."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    chunk = 1_000_000
    with pacsv.CSVWriter(
        path,
        pa.schema(
            [
                ("age", pa.string()),
                ("weight", pa.float64()),
                ("height", pa.float64()),
                ("smoker", pa.int8()),
            ]
        ),
        write_options=pacsv.WriteOptions(quoting_style="none"),
    ) as writer:
        done = 0
        while done < rows:
            n = min(chunk, rows - done)
            age = rng.integers(18, 95, n).astype(str).astype(object)
            age[rng.random(n) < 0.01] = "NA"
            table = pa.table(
                {
                    "age": pa.array(age, pa.string()),
                    "weight": np.round(rng.normal(75, 12, n), 2),
                    "height": np.round(rng.normal(170, 9, n), 2),
                    "smoker": rng.integers(0, 2, n).astype(np.int8),
                }
            )
            writer.write_table(table)
            done += n


def csv_benchmark(folder: Path, rows: int, repeats: int) -> dict[str, Any]:
    path = folder / "big.csv"
    write_csv(path, rows)
    size = path.stat().st_size
    runs: dict[str, list[dict[str, Any]]] = {"flame": [], "pyarrow": [], "isolated": []}
    for _ in range(repeats):
        for mode in runs:  # interleaved, so machine noise hits both alike
            runs[mode].append(child(CHILD, mode, folder))
    med = {
        mode: {
            "seconds": statistics.median(r["seconds"] for r in results),
            "extra_mb": statistics.median((r["peak_kb"] - r["base_kb"]) / 1024 for r in results),
            "peak_mb": statistics.median(r["peak_kb"] / 1024 for r in results),
        }
        for mode, results in runs.items()
    }
    time_ratio = med["flame"]["seconds"] / med["pyarrow"]["seconds"]
    isolated_ratio = med["isolated"]["seconds"] / med["pyarrow"]["seconds"]
    rss_ratio = med["flame"]["extra_mb"] * 1024 * 1024 / size
    print(f"\nCSV read: {rows:,} rows x 4 columns, {size / 1e6:.1f} MB, median of {repeats}")
    print(f"{'reader':<26}{'time s':>9}{'peak RSS MB':>13}{'reading MB':>12}")
    for mode, label in (("flame", "data.read_csv()"), ("pyarrow", "pyarrow.csv.read_csv")):
        m = med[mode]
        print(f"{label:<26}{m['seconds']:>9.3f}{m['peak_mb']:>13.0f}{m['extra_mb']:>12.0f}")
    m = med["isolated"]  # the read happens in the child: the parent's RSS says nothing
    print(f"{'isolated read_csv()':<26}{m['seconds']:>9.3f}{'-':>13}{'-':>12}")
    print(f"time ratio flame/pyarrow: {time_ratio:.2f} (target <= 1.5)")
    print(
        f"time ratio isolated/pyarrow: {isolated_ratio:.2f} (target <= 1.5; the whole "
        "epoch: request, descriptor, row count, read in the child, reply)"
    )
    print(f"reading RSS / file size: {rss_ratio:.2f} (target <= 3)")
    return {
        "time_ratio": time_ratio,
        "isolated_ratio": isolated_ratio,
        "rss_ratio": rss_ratio,
        **med,
    }


def duckdb_benchmark(folder: Path, rows: int) -> dict[str, Any]:
    path = folder / "huge.csv"
    write_csv(path, rows, seed=1)
    size = path.stat().st_size
    ours = child(CHILD, "sql", folder)
    base = child(CHILD, "pyarrow_mean", folder)
    peak_mb = ours["peak_kb"] / 1024
    print(f"\nColumn mean of a {size / 1e6:.0f} MB CSV ({rows:,} rows)")
    print(f"{'path':<40}{'time s':>9}{'peak RSS MB':>13}")
    print(f"{'data.sql(select avg(age) ...)':<40}{ours['seconds']:>9.2f}{peak_mb:>13.0f}")
    label = "pyarrow read_csv + compute.mean"
    print(f"{label:<40}{base['seconds']:>9.2f}{base['peak_kb'] / 1024:>13.0f}")
    print(
        f"data.sql: {ours['seconds']:.2f} s (target <= 5), {peak_mb:.0f} MB (target <= 1024); "
        f"time ratio to the in-memory baseline {ours['seconds'] / base['seconds']:.2f}, "
        f"RSS ratio {ours['peak_kb'] / base['peak_kb']:.2f}"
    )
    return {"seconds": ours["seconds"], "peak_mb": peak_mb, "mean": ours["rows"]["mean"]}


SQL_ROLE = "flame_bench_reader"
SQL_DATABASE = "flame_bench_sql"
"""Fixed names, so a run interrupted before its clean-up is cleaned up by the next one (two
runs at once against one server would share them: run one at a time)."""


def _pg(server: str, database: str, *, user: str | None = None, password: str = "") -> str:
    """`server` (postgresql://user@host:port) pointed at `database`, as `user` if given."""
    parts = urlsplit(server)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}:{quote(password, safe='')}@{netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, f"/{database}", parts.query, ""))


def _admin(server: str, database: str = "postgres") -> Any:
    """A connection as --pg's (super)user, with timeouts: nothing here waits forever."""
    import psycopg

    return psycopg.connect(
        _pg(server, database),
        autocommit=True,
        connect_timeout=5,
        options="-c statement_timeout=600000 -c lock_timeout=10000",
    )


_EXISTS = {
    "role": "select 1 from pg_roles where rolname = %s",
    "database": "select 1 from pg_database where datname = %s",
}


def _exists(conn: Any, kind: str, name: str) -> bool:
    return conn.execute(_EXISTS[kind], [name]).fetchone() is not None


def _why(exc: BaseException, server: str) -> str:
    """The error's class and first line, --pg's password masked: a one-line reason."""
    from flame.clients.token import redact

    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: {redact(first, [urlsplit(server).password or ''])}"


def sql_scratch(server: str, rows: int) -> str:
    """Make (again) the scratch database with table `t` of `rows` rows and a login role that
    is no superuser and may only SELECT `t`, as the tests' PostgresServer.create_database
    does (SqlSource refuses a privileged role); the URL to read it as that role."""
    from psycopg import sql

    password = uuid.uuid4().hex  # unused under trust auth; needed where passwords are asked
    with _admin(server) as conn:
        role, database = sql.Identifier(SQL_ROLE), sql.Identifier(SQL_DATABASE)
        if _exists(conn, "role", SQL_ROLE):
            conn.execute(sql.SQL("alter role {} nosuperuser login").format(role))
        else:
            conn.execute(sql.SQL("create role {} nosuperuser login").format(role))
        conn.execute(sql.SQL("alter role {} password {}").format(role, sql.Literal(password)))
        if not _exists(conn, "database", SQL_DATABASE):
            conn.execute(sql.SQL("create database {}").format(database))
        conn.execute(sql.SQL("grant connect on database {} to {}").format(database, role))
    with _admin(server, SQL_DATABASE) as conn:
        conn.execute(sql.SQL("grant usage on schema public to {}").format(role))
        conn.execute("drop table if exists t")
        conn.execute(
            "create table t as select g::int8 as id, random() as x, "
            "round((random() * 100)::numeric, 2) as v, 'row ' || g as label "
            "from generate_series(1, %s) g",
            [rows],
        )
        conn.execute(sql.SQL("grant select on t to {}").format(role))
    return _pg(server, SQL_DATABASE, user=SQL_ROLE, password=password)


def sql_drop_scratch(server: str) -> None:
    """Drop the scratch database (its table and grants go with it), then the role."""
    import psycopg
    from psycopg import sql

    try:  # only what exists: a user that could create neither may not even try to drop
        with _admin(server) as conn:
            if _exists(conn, "database", SQL_DATABASE):
                conn.execute(sql.SQL("drop database {} with (force)").format(
                    sql.Identifier(SQL_DATABASE)))  # fmt: skip
            if _exists(conn, "role", SQL_ROLE):
                conn.execute(sql.SQL("drop role {}").format(sql.Identifier(SQL_ROLE)))
    except psycopg.Error as exc:
        print(f"SQL: could not drop {SQL_DATABASE!r} / {SQL_ROLE!r} ({_why(exc, server)}); "
              "the next run drops them")  # fmt: skip


def sql_benchmark(server: str, rows: int, repeats: int) -> dict[str, Any] | None:
    try:
        import psycopg
        import pyarrow as pa
    except ImportError:
        print("\nSQL: skipped, psycopg is not installed (pip install 'flame[sql]')")
        return None
    from flame.data.sources.sql import SqlSource

    where = urlsplit(server).netloc.rpartition("@")[2]  # never the user or a password
    try:
        with _admin(server) as conn:
            conn.execute("select 1")
    except psycopg.Error as exc:
        print(f"\nSQL: skipped, cannot connect to PostgreSQL at {where} ({_why(exc, server)})")
        return None
    query = "select id, x, v, label from t"
    try:
        try:
            url = sql_scratch(server, rows)
        except psycopg.Error as exc:  # e.g. --pg's user may not create roles or databases
            print(f"\nSQL: skipped, cannot set up the scratch role and table at {where} "
                  f"({_why(exc, server)})")  # fmt: skip
            return None

        def baseline() -> float:
            from psycopg.types.numeric import FloatLoader

            start = time.perf_counter()
            with psycopg.connect(url, connect_timeout=5) as conn:
                conn.adapters.register_loader("numeric", FloatLoader)
                records = conn.execute(query).fetchall()
                columns = list(zip(*records, strict=True))
                table = pa.table(
                    {
                        n: pa.array(c)
                        for n, c in zip(("id", "x", "v", "label"), columns, strict=True)
                    }
                )
            assert table.num_rows == rows
            return time.perf_counter() - start

        def ours() -> float:
            start = time.perf_counter()
            source = SqlSource("bench", url)
            table = source.query(query)
            source.close()
            assert table.num_rows == rows
            return time.perf_counter() - start

        times: dict[str, list[float]] = {"psycopg": [], "flame": []}
        for _ in range(repeats):
            times["psycopg"].append(baseline())
            times["flame"].append(ours())
    finally:
        sql_drop_scratch(server)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["psycopg"] / med["flame"]
    print(f"\nSQL into Arrow: {rows:,} rows x 4 columns, median of {repeats}, "
          f"as the non-superuser role {SQL_ROLE!r}")  # fmt: skip
    print(f"{'path':<44}{'time s':>9}{'rows/s':>14}")
    print(f"{'psycopg fetchall -> pyarrow.table':<44}{med['psycopg']:>9.3f}"
          f"{rows / med['psycopg']:>14,.0f}")  # fmt: skip
    print(f"{'SqlSource.query (server-side cursor)':<44}{med['flame']:>9.3f}"
          f"{rows / med['flame']:>14,.0f}")  # fmt: skip
    print(f"throughput ratio flame/psycopg: {ratio:.2f} (target >= 0.7)")
    return {"ratio": ratio, **med}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tenfold smaller")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only", choices=("csv", "duckdb", "sql"), help="run one benchmark (default: all)"
    )
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="flame-bench-data-") as tmp:
        folder = Path(tmp)
        if args.only in (None, "csv"):
            csv = csv_benchmark(folder, 1_000_000 // scale, args.repeats)
            (folder / "big.csv").unlink()
            verdicts += [
                ("read_csv time <= 1.5x pyarrow", csv["time_ratio"] <= 1.5),
                ("isolated read_csv time <= 1.5x pyarrow", csv["isolated_ratio"] <= 1.5),
                ("read_csv RSS <= 3x file", csv["rss_ratio"] <= 3),
            ]
        if args.only in (None, "duckdb"):
            duck = duckdb_benchmark(folder, 10_000_000 // scale)
            verdicts += [
                ("data.sql <= 5 s", duck["seconds"] <= 5),
                ("data.sql <= 1 GB", duck["peak_mb"] <= 1024),
            ]
    if args.only in (None, "sql"):
        sql = sql_benchmark(args.pg, 1_000_000 // scale, args.repeats)
        if sql is not None:
            verdicts.append(("SQL >= 0.7x psycopg", sql["ratio"] >= 0.7))
    if verdicts:
        print("\n" + "\n".join(f"{'PASS' if ok else 'MISS'}  {name}" for name, ok in verdicts))


if __name__ == "__main__":
    main()

"""Create one OMOP CDM database per simulated node from data/<node>.sql (replacing any).

    python examples/omop_measurements/create_databases.py [postgresql://postgres@127.0.0.1:5432]

Database names are `flame_omop_<node>`, as `nodes.toml` expects; the nodes connect as
`flame_omop_reader`, a login role made here that may only CONNECT and SELECT (flame refuses a
superuser source). Needs psycopg (`pip install 'flame[sql]'`) and a PostgreSQL user allowed to
create databases and roles.
"""

import sys
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

HERE = Path(__file__).resolve().parent


READER = "flame_omop_reader"


def create(server: str, prefix: str = "flame_omop_") -> dict[str, str]:
    """node -> database URL (as the reader role), each database freshly loaded."""
    urls = {}
    with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=10) as admin:
        if admin.execute("select 1 from pg_roles where rolname = %s", [READER]).fetchone() is None:
            admin.execute(f'create role "{READER}" login')
    parts = urlsplit(server)
    reader_server = f"postgresql://{READER}@{parts.hostname}:{parts.port or 5432}"
    for script in sorted((HERE / "data").glob("*.sql")):
        name = prefix + script.stem
        with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'drop database if exists "{name}"')
            admin.execute(f'create database "{name}"')
            admin.execute(f'grant connect on database "{name}" to "{READER}"')
        with psycopg.connect(f"{server}/{name}", autocommit=True, connect_timeout=10) as conn:
            conn.execute(script.read_text())
            conn.execute(f'grant select on all tables in schema public to "{READER}"')
        urls[script.stem] = f"{reader_server}/{name}"
    return urls


if __name__ == "__main__":
    for node, url in create(
        sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432"
    ).items():
        print(f"{node}: {url}")

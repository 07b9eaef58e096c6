"""Create one OMOP CDM database per simulated node from data/<node>.sql (replacing any).

    python examples/omop_measurements/create_databases.py [postgresql://postgres@127.0.0.1:5432]

Database names are `flame_omop_<node>`, as `nodes.toml` expects. Needs psycopg
(`pip install 'flame[sql]'`) and a PostgreSQL user allowed to create databases.
"""

import sys
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent


def create(server: str, prefix: str = "flame_omop_") -> dict[str, str]:
    """node -> database URL, each database freshly loaded from the node's SQL file."""
    urls = {}
    for script in sorted((HERE / "data").glob("*.sql")):
        name = prefix + script.stem
        with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'drop database if exists "{name}"')
            admin.execute(f'create database "{name}"')
        with psycopg.connect(f"{server}/{name}", autocommit=True, connect_timeout=10) as conn:
            conn.execute(script.read_text())
        urls[script.stem] = f"{server}/{name}"
    return urls


if __name__ == "__main__":
    for node, url in create(
        sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432"
    ).items():
        print(f"{node}: {url}")

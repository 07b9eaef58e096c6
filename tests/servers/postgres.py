"""A real PostgreSQL for tests: the server on 127.0.0.1:5432 when one answers (trust auth, user
postgres), else a throwaway cluster made with initdb / pg_ctl on a free port in a temp dir.

Each test gets its own databases (`create_database`), dropped afterwards, so simulated nodes
never share one. initdb refuses to run as root; as root the cluster is run as the `postgres`
user (Debian's package creates it) or `nobody`.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg

_ids = itertools.count(1)


def _answers(host: str, port: int) -> bool:
    try:
        with psycopg.connect(
            host=host, port=port, user="postgres", dbname="postgres", connect_timeout=2
        ) as conn:
            conn.execute("select 1")
        return True
    except psycopg.Error:
        return False


def _binaries() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """Where the tests' PostgreSQL is, and databases made and dropped on it."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 5432
        self._cluster: Path | None = None
        self._bin: Path | None = None
        self._user: str | None = None
        self._readers: dict[str, tuple[str, str]] = {}

    def start(self) -> PostgresServer:
        if _answers(self.host, self.port):
            return self
        self._bin = _binaries()
        if self._bin is None:
            raise RuntimeError("no PostgreSQL: nothing on 127.0.0.1:5432 and no initdb found")
        self._cluster = Path(tempfile.mkdtemp(prefix="flame-pg-"))
        self.port = _free_port()
        user = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    pwd.getpwnam(name)
                    user = name
                    break
                except KeyError:
                    continue
            shutil.chown(self._cluster, user=user)
        self._user = user
        data = self._cluster / "data"
        self._run(
            [
                str(self._bin / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        options = f"-p {self.port} -k {self._cluster} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            [
                str(self._bin / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "-l",
                str(self._cluster / "log"),
                "start",
            ]
        )
        return self

    def _run(self, argv: list[str]) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=120, user=self._user)

    def stop(self) -> None:
        if self._cluster is None or self._bin is None:
            return
        try:
            self._run(
                [
                    str(self._bin / "pg_ctl"),
                    "-D",
                    str(self._cluster / "data"),
                    "-m",
                    "fast",
                    "-w",
                    "stop",
                ]
            )
        finally:
            shutil.rmtree(self._cluster, ignore_errors=True)

    def url(self, database: str, user: str | None = None, password: str | None = None) -> str:
        """A URL for `database`: by default as its SELECT-only reader role, if it has one."""
        if user is None:
            user, password = self._readers.get(database, ("postgres", None))
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    def reader(self, database: str) -> str:
        """The name of `database`'s SELECT-only login role."""
        return self._readers[database][0]

    def superuser_url(self, database: str) -> str:
        return self.url(database, user="postgres")

    def admin(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.superuser_url(database), autocommit=True, connect_timeout=10)

    def create_database(self, prefix: str = "flame_test") -> str:
        """A fresh database plus its own login role that may only CONNECT and SELECT.

        Default privileges make tables that postgres creates there later readable by the role,
        so sources connect as it, not as the superuser (which SqlSource refuses).
        """
        name = f"{prefix}_{os.getpid()}_{next(_ids)}_{uuid.uuid4().hex[:6]}"
        reader, password = f"{name}_r", uuid.uuid4().hex
        with self.admin() as conn:
            conn.execute(f'create database "{name}"')
            conn.execute(f"create role \"{reader}\" login password '{password}'")
            conn.execute(f'grant connect on database "{name}" to "{reader}"')
        with self.admin(name) as conn:
            conn.execute(f'grant usage on schema public to "{reader}"')
            conn.execute(
                f"alter default privileges for role postgres in schema public "
                f'grant select on tables to "{reader}"'
            )
        self._readers[name] = (reader, password)
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')
            reader = self._readers.pop(name, None)
            if reader is not None:
                conn.execute(f'drop role if exists "{reader[0]}"')

    def execute(self, database: str, sql: str) -> None:
        with self.admin(database) as conn:
            conn.execute(sql)

"""PostgreSQL as a data source: read-only queries streamed into Arrow record batches.

Every query runs in a READ ONLY transaction (a write is refused by the server, not by
parsing), through a server-side (named) cursor that is fetched `batch_rows` rows at a time, so
a large result never sits in memory twice. Every statement (each FETCH too) runs under the
statement timeout, set for the transaction at its start and enforced from here as well (a
watchdog cancels it): the query cannot switch it off (`SET`, `set_config`), and the
transaction is always rolled back, so nothing a query sets outlives it on the kept
connection. Inside a node serving an isolated analysis, the limit is also capped at what is
left of the epoch (`flame.utils.deadline.call_deadline`). A statement that survives the
cancel (PL/pgSQL can trap it) is ended `_KILL_AFTER` seconds later: its socket is shut and
its backend terminated from a fresh connection. Anonymous code blocks (`DO`) and `CALL` are
refused; session-level advisory locks are released after every query.
NUMERIC becomes float64. Errors name the source and what went wrong; the password (from the
URL or from `token` / `token_file`) never appears in a message or a log line.

`psycopg` (3.x) is imported on first use: `pip install 'flame[sql]'`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Generator, Iterator, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

import pyarrow as pa

from flame.clients.token import TokenError, TokenSource, redact, source_service_name
from flame.config import DataSourceSettings
from flame.data.sources.placeholders import STYLE_HINT, psycopg_query
from flame.errors import DataError
from flame.utils.deadline import call_left

__all__ = ["SqlSource"]

log = logging.getLogger(__name__)

QueryParams = Sequence[Any] | dict[str, Any] | None

_ARROW_TYPES: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int2": pa.int16(),
    "int4": pa.int32(),
    "int8": pa.int64(),
    "oid": pa.int64(),
    "float4": pa.float32(),
    "float8": pa.float64(),
    "numeric": pa.float64(),
    "text": pa.string(),
    "varchar": pa.string(),
    "bpchar": pa.string(),
    "name": pa.string(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us"),
    "timestamptz": pa.timestamp("us", tz="UTC"),
    "bytea": pa.binary(),
}


_GRACE = 0.5
"""Seconds the watchdog gives the server's own statement timeout before it cancels."""

_KILL_AFTER = 1.5
"""Seconds after the cancel before a statement that ignored it has its connection ended."""

_PROCEDURAL = re.compile(r"\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*(do|call)\b", re.I | re.S)
"""DO and CALL: procedural code, which can trap the cancel and the statement timeout."""

_PRIVILEGED_ROLES = (
    "pg_read_server_files",
    "pg_write_server_files",
    "pg_execute_server_program",
    "pg_read_all_data",
    "pg_write_all_data",
)
"""Predefined roles that reach past the tables granted to the source's role."""

_ROLE_CHECK = """
select r.rolsuper, r.rolname,
       array(select p.rolname::text from pg_roles p
             where p.rolname = any(%s) and pg_has_role(r.oid, p.oid, 'MEMBER')
             order by p.rolname)
from pg_roles r where r.rolname = current_user
"""


def _cancel(connection: Any) -> None:
    """Cancel the running statement (from the watchdog's thread; errors are the server's)."""
    with contextlib.suppress(Exception):
        connection.cancel_safe(timeout=5.0)


def _shut(connection: Any) -> None:
    """Shut the connection's socket down: the thread waiting on it gets an error at once
    (closing the connection itself from another thread would race with that thread)."""
    with (
        contextlib.suppress(Exception),
        socket.socket(fileno=os.dup(connection.pgconn.socket)) as sock,
    ):
        sock.shutdown(socket.SHUT_RDWR)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - depends on the installation
        raise DataError(
            "SQL sources need psycopg 3: pip install 'flame[sql]' (or psycopg[binary])"
        ) from None
    return psycopg


class SqlSource:
    """A PostgreSQL database: `query(sql, params)` -> `pyarrow.Table`, `batches(...)` streams."""

    kind: Literal["sql"] = "sql"
    remote_methods = ("query", "to_pandas")  # what an isolated analysis may call

    def __init__(
        self,
        name: str,
        url: str,
        *,
        password: str | TokenSource | None = None,
        statement_timeout: float = 300.0,
        connect_timeout: float = 10.0,
        batch_rows: int = 65_536,
        allow_privileged_role: bool = False,
    ) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise DataError(f"data source {name!r}: url must start with postgresql://")
        self.name = name
        self._url = url
        self._password = password
        self.statement_timeout = statement_timeout
        self.connect_timeout = connect_timeout
        self.batch_rows = batch_rows
        self.allow_privileged_role = allow_privileged_role
        self._connection: Any = None
        self._killed = False  # the last statement ignored the cancel and was ended
        self._lock = threading.Lock()
        self._limit_why = f"the statement timeout of {statement_timeout:g} s"
        parts = urlsplit(url)
        self._secrets = [s for s in (parts.password, url) if s]
        host = parts.hostname or "localhost"
        self.where = f"{host}:{parts.port or 5432}{parts.path}"
        """Host, port and database: what errors show (never user or password)."""

    @classmethod
    def from_settings(
        cls, settings: DataSourceSettings, tokens: TokenSource | None = None
    ) -> SqlSource:
        """A source from config; the password is `token`/`token_file` when one is set."""
        if not settings.url:
            raise DataError(f"data source {settings.name!r}: kind=sql needs a url")
        password = tokens if tokens is not None and tokens.configured else None
        return cls(
            settings.name,
            settings.url,
            password=password,
            statement_timeout=settings.statement_timeout,
            connect_timeout=settings.timeout,
            allow_privileged_role=settings.allow_privileged_role,
        )

    # --- connection --------------------------------------------------------------------------
    def _password_now(self) -> str | None:
        if isinstance(self._password, TokenSource):
            return self._password.get()
        return self._password

    def _fail(self, exc: BaseException, what: str) -> DataError:
        psycopg = _psycopg()
        errors = psycopg.errors
        secrets = [*self._secrets, self._password_now() or ""]
        detail = ""
        diag = getattr(exc, "diag", None)
        primary = getattr(diag, "message_primary", None) if diag is not None else None
        text = primary or str(exc).strip().splitlines()[-1:] or [""]
        detail = redact(text if isinstance(text, str) else text[0], secrets)[:300]
        prefix = f"data source {self.name!r} ({self.where}): {what}"
        if self._killed:
            return DataError(
                f"{prefix}: the statement ran past {self._limit_why} and ignored the cancel, "
                "so its connection was ended"
            )
        if isinstance(exc, errors.QueryCanceled):
            return DataError(f"{prefix}: the statement ran past {self._limit_why} ({detail})")
        if isinstance(exc, errors.ReadOnlySqlTransaction):
            return DataError(f"{prefix}: refused, the source is read-only ({detail})")
        if isinstance(exc, (errors.InvalidPassword, errors.InvalidAuthorizationSpecification)):
            return DataError(f"{prefix}: credentials rejected ({detail})")
        from flame.privacy.quoting import quote_parser_message  # 'invalid input ... "x"'

        hint = isinstance(exc, psycopg.ProgrammingError) and "placeholder" in detail
        detail = quote_parser_message(detail)
        if hint:
            detail = f"{detail}; {STYLE_HINT}"
        return DataError(f"{prefix}: {type(exc).__name__}: {detail}")

    def _connect(self) -> Any:
        if self._connection is not None and not self._connection.closed:
            return self._connection
        psycopg = _psycopg()
        from psycopg.types.numeric import FloatLoader

        timeout_ms = max(1, round(self.statement_timeout * 1000))
        kwargs: dict[str, Any] = {
            "connect_timeout": max(1, round(self.connect_timeout)),
            "options": f"-c statement_timeout={timeout_ms} -c default_transaction_read_only=on",
            "application_name": "flame",
        }
        password = self._password_now()
        if password is not None:
            kwargs["password"] = password
        try:
            connection = psycopg.connect(self._url, **kwargs)
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.OperationalError) and "authentication" in str(exc):
                raise TokenError(
                    source_service_name(self.name),
                    f"credentials rejected by {self.where}",
                ) from None
            raise self._fail(exc, "cannot connect") from None
        connection.read_only = True
        connection.adapters.register_loader("numeric", FloatLoader)
        try:
            self._check_role(connection)
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection

    def _check_role(self, connection: Any) -> None:
        """Refuse a role that reaches past the database: server files, programs, every table.

        A superuser or a member of these roles lets analysis code `pg_read_file(...)`, run
        programs or read every table (pg_read_all_data includes pg_authid's password hashes);
        the read-only transaction stops none of that. Checked once per connection.
        """
        psycopg = _psycopg()
        try:
            with connection.transaction(), connection.cursor() as cursor:
                cursor.execute(_ROLE_CHECK, [list(_PRIVILEGED_ROLES)])
                row = cursor.fetchone()
        except psycopg.Error as exc:
            raise self._fail(exc, "cannot check the role's privileges") from None
        if row is None:  # current_user always has a pg_roles row; refuse if it did not
            raise DataError(f"data source {self.name!r} ({self.where}): cannot see its own role")
        role = str(row[1])
        granted = ["superuser"] if row[0] else [str(m) for m in row[2]]
        if not granted:
            return
        what = ", ".join(granted)
        if self.allow_privileged_role:
            log.warning(
                "data source %r (%s): role %r is privileged (%s); allowed by "
                "allow_privileged_role, analysis code can read server files or every table",
                self.name,
                self.where,
                role,
                what,
            )
            return
        raise DataError(
            f"data source {self.name!r} ({self.where}): refused to use role {role!r}, which "
            f"is privileged ({what}): analysis code could read the server's files or every "
            "table. Give the source a role that can only SELECT the tables it should "
            "(or set allow_privileged_role = true to accept the risk)"
        )

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def probe(self) -> None:
        """Connect and run `select 1`: a bad password or host stops the node at start-up."""
        self.query("select 1 as ok")

    # --- queries -----------------------------------------------------------------------------
    def batches(self, sql: str, params: QueryParams = None) -> Iterator[pa.RecordBatch]:
        """The result as Arrow record batches of up to `batch_rows` rows, streamed.

        A SELECT runs through a server-side cursor. Anything else (which DECLARE CURSOR
        refuses) runs as one prepared statement in the same kind of READ ONLY transaction,
        after a first query has fixed the snapshot, so it can neither write nor switch the
        transaction to read-write; multiple statements in one string are refused.
        """
        psycopg = _psycopg()
        sql = psycopg_query(sql, params)  # `?` as data.sql takes them
        with self._lock:
            connection = self._connect()
            self._killed = False
            produced = False
            try:
                try:  # closed here, not by the garbage collector: its transaction ends first
                    with contextlib.closing(
                        self._stream(connection, sql, params, server_side=True)
                    ) as stream:
                        for batch in stream:
                            produced = True
                            yield batch
                except psycopg.errors.SyntaxError:
                    if produced:
                        raise
                    if _PROCEDURAL.match(sql):
                        raise DataError(
                            f"data source {self.name!r} ({self.where}): refused, DO and CALL "
                            "run procedural code; send a query"
                        ) from None
                    yield from self._stream(connection, sql, params, server_side=False)
            except psycopg.Error as exc:
                if connection.broken:
                    self._drop(connection)
                raise self._fail(exc, "query failed") from None
            finally:
                self._reset(connection)

    def _drop(self, connection: Any) -> None:
        with contextlib.suppress(Exception):
            connection.close()
        if self._connection is connection:
            self._connection = None

    def _reset(self, connection: Any) -> None:
        """Release session-level advisory locks (a rollback keeps them): held past the query
        they would block other clients or pass a signal to the next query. On any error the
        connection is dropped instead."""
        psycopg = _psycopg()
        idle = psycopg.pq.TransactionStatus.IDLE
        if connection.closed or connection.broken or connection.info.transaction_status != idle:
            self._drop(connection)
            return
        try:
            with connection.transaction(force_rollback=True):
                connection.execute("select pg_advisory_unlock_all()")
        except Exception:
            self._drop(connection)

    def _stream(
        self, connection: Any, sql: str, params: QueryParams, *, server_side: bool
    ) -> Generator[pa.RecordBatch, None, None]:
        name = f"flame_{uuid.uuid4().hex[:12]}" if server_side else None
        # rolled back, never committed: a SET or set_config(..., false) of the query ends here
        with connection.transaction(force_rollback=True):
            with self._watched(connection) as limit:
                connection.execute(
                    "select set_config('statement_timeout', %s, true)",
                    [str(max(1, round(limit * 1000)))],
                )
            with connection.cursor(name=name) as cursor:
                with self._watched(connection):
                    if server_side:
                        cursor.itersize = self.batch_rows
                        cursor.execute(sql, params)
                    else:
                        cursor.execute("select 1")  # the snapshot: no switch to read-write
                        cursor.execute(sql, params, prepare=True)
                schema = self._schema(cursor.description or [])
                produced = False
                while cursor.description is not None:
                    with self._watched(connection):  # each FETCH: the query may have reset it
                        rows = cursor.fetchmany(self.batch_rows)
                    if not rows:
                        break
                    produced = True
                    yield self._batch(schema, rows)
                if not produced:
                    yield pa.RecordBatch.from_pylist([], schema=schema)

    @contextlib.contextmanager
    def _watched(self, connection: Any) -> Iterator[float]:
        """One statement's limit (the statement timeout, or less when the epoch ends sooner),
        enforced by cancelling the statement from a timer if the server has not."""
        limit = call_left(self.statement_timeout)
        if limit < self.statement_timeout:
            self._limit_why = f"the epoch's deadline ({limit:.1f} s were left)"
        else:
            self._limit_why = f"the statement timeout of {self.statement_timeout:g} s"
        if limit <= 0:
            raise DataError(
                f"data source {self.name!r} ({self.where}): no time left before the epoch's "
                "deadline"
            )
        done = threading.Event()  # a kill racing the statement's end must not end the next
        timers = [
            threading.Timer(limit + _GRACE, _cancel, [connection]),
            threading.Timer(limit + _GRACE + _KILL_AFTER, self._kill, [connection, done]),
        ]
        for timer in timers:
            timer.daemon = True
            timer.start()
        try:
            yield limit
        finally:
            done.set()
            for timer in timers:
                timer.cancel()

    def _kill(self, connection: Any, done: threading.Event) -> None:
        """End a statement that ignored the cancel: shut its socket (the query fails now)
        and terminate its backend, which would otherwise run on, from a fresh connection."""
        if done.is_set():
            return
        self._killed = True
        pid = connection.info.backend_pid
        _shut(connection)
        log.warning("data source %r (%s): a statement ignored the cancel", self.name, self.where)
        kwargs: dict[str, Any] = {
            "connect_timeout": max(1, round(self.connect_timeout)),
            "options": "-c statement_timeout=5000",
            "application_name": "flame-kill",
        }
        with contextlib.suppress(Exception):
            password = self._password_now()
            if password is not None:
                kwargs["password"] = password
            with _psycopg().connect(self._url, autocommit=True, **kwargs) as other:
                other.execute("select pg_terminate_backend(%s)", [pid])

    def query(self, sql: str, params: QueryParams = None) -> pa.Table:
        """The whole result as a `pyarrow.Table` (`?`, `%s` or `%(name)s` placeholders)."""
        return pa.Table.from_batches(list(self.batches(sql, params)))

    def to_pandas(self, sql: str, params: QueryParams = None) -> Any:
        """The result as a pandas DataFrame (needs `flame[pandas]`)."""
        return self.query(sql, params).to_pandas()

    @staticmethod
    def _schema(description: Sequence[Any]) -> pa.Schema:
        from psycopg.postgres import types

        fields = []
        for column in description:
            info = types.get(column.type_code)
            arrow_type = _ARROW_TYPES.get(info.name if info is not None else "", pa.null())
            fields.append(pa.field(column.name, arrow_type))
        return pa.schema(fields)

    @staticmethod
    def _batch(schema: pa.Schema, rows: list[tuple[Any, ...]]) -> pa.RecordBatch:
        columns = list(zip(*rows, strict=True)) if rows else [() for _ in schema]
        arrays = []
        fields = []
        for field, values in zip(schema, columns, strict=True):
            if pa.types.is_null(field.type):  # a type without a mapping: let Arrow infer it
                try:
                    array = pa.array(values)
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    array = pa.array([None if v is None else str(v) for v in values])
            else:
                array = pa.array(values, type=field.type)
            arrays.append(array)
            fields.append(pa.field(field.name, array.type))
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))

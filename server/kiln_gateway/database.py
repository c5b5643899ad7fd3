"""The gateway's database: one SQL layer over SQLite (the default) and PostgreSQL.

`Database.open(url)` connects to `sqlite:///PATH` or `postgresql://...` and brings the
schema up to date. Every statement is written once, in the SQL both dialects share: `?`
placeholders (turned into `%s` for psycopg), integers for flags, and three type words in
the table definitions that differ per dialect (`{id}`, `{blob}`, `{real}`).

Schema changes are numbered migrations recorded in the `schema_version` table; each start
applies the missing ones in one transaction (PostgreSQL replicas starting together take
turns through an advisory lock). A database written by a newer gateway is refused.

All work runs on one worker thread, in the order it was submitted; each `run(fn)` is one
transaction, committed when `fn` returns and rolled back when it raises. Running statements
in submission order is what keeps a prediction's changes (and its webhook messages) in the
order they happened.

SQLite is for one gateway process: the database is locked (`<PATH>.lock`) for as long as
a gateway has it open, and a second gateway on the same file is refused with a message
pointing to PostgreSQL. It runs in WAL mode with `synchronous=FULL`, so a committed change
survives a crash of the gateway or of the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

__all__ = ["Database", "DatabaseError", "Dialect", "Row", "Session", "describe_url"]

log = logging.getLogger("kiln_gateway.database")

Dialect = Literal["sqlite", "postgresql"]
Row = dict[str, Any]
T = TypeVar("T")

_TYPES: dict[Dialect, dict[str, str]] = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB", "real": "REAL"},
    "postgresql": {
        "id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "blob": "BYTEA",
        "real": "DOUBLE PRECISION",
    },
}
_MIGRATION_LOCK = 0x6B696C6E  # an arbitrary advisory-lock key for this schema ("kiln")

MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE predictions (
                seq {id},
                id TEXT NOT NULL UNIQUE,
                owner TEXT NOT NULL,
                model TEXT NOT NULL,
                version TEXT NOT NULL,
                kiln_model TEXT NOT NULL,
                input TEXT NOT NULL,
                request {blob},
                base_url TEXT NOT NULL,
                inline_outputs INTEGER NOT NULL,
                file_token TEXT NOT NULL,
                created_at {real} NOT NULL,
                status TEXT NOT NULL,
                started_at {real},
                completed_at {real},
                outputs TEXT NOT NULL,
                output_bytes BIGINT NOT NULL,
                error TEXT,
                metrics TEXT NOT NULL,
                data_removed INTEGER NOT NULL,
                webhook TEXT,
                cancel_requested INTEGER NOT NULL,
                submissions INTEGER NOT NULL,
                lease_owner TEXT,
                lease_expires {real} NOT NULL
            )""",
            "CREATE INDEX predictions_owner ON predictions (owner, seq)",
            "CREATE INDEX predictions_status ON predictions (status, lease_expires)",
            "CREATE INDEX predictions_file_token ON predictions (file_token)",
            "CREATE INDEX predictions_kiln_model ON predictions (kiln_model)",
            "CREATE INDEX predictions_data ON predictions (data_removed, completed_at)",
            """CREATE TABLE prediction_events (
                prediction_id TEXT NOT NULL,
                position INTEGER NOT NULL,
                event TEXT NOT NULL,
                data TEXT NOT NULL,
                PRIMARY KEY (prediction_id, position)
            )""",
            """CREATE TABLE webhook_deliveries (
                id {id},
                prediction_id TEXT NOT NULL,
                message_id TEXT NOT NULL,
                url TEXT NOT NULL,
                body {blob} NOT NULL,
                state TEXT NOT NULL,
                attempts INTEGER NOT NULL,
                next_attempt_at {real} NOT NULL,
                lease_owner TEXT,
                lease_expires {real} NOT NULL,
                last_error TEXT
            )""",
            "CREATE INDEX webhook_pending ON webhook_deliveries (state, prediction_id, id)",
        ),
    ),
)
"""Every schema version in order: (version, statements). Append; never edit a shipped one."""


class DatabaseError(Exception):
    """The database cannot be opened or used; the message says why (never a password)."""


def describe_url(url: str) -> str:
    """`url` with any password removed, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}{netloc}"))


class Session:
    """Statements inside one transaction (what `Database.run` hands its function)."""

    def __init__(self, connection: Any, dialect: Dialect) -> None:
        self._connection = connection
        self.dialect: Dialect = dialect

    def _sql(self, sql: str) -> str:
        return sql if self.dialect == "sqlite" else sql.replace("?", "%s")

    def execute(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[Row]:
        """Run one statement; its rows as dicts (empty when it returns none)."""
        cursor = self._connection.execute(self._sql(sql), tuple(params))
        if cursor.description is None:
            return []
        if self.dialect == "sqlite":
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        return list(cursor.fetchall())

    def one(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> Row | None:
        """The first row of a statement, or None."""
        rows = self.execute(sql, params)
        return rows[0] if rows else None

    def count(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> int:
        """Run one statement that returns no rows; how many rows it changed."""
        cursor = self._connection.execute(self._sql(sql), tuple(params))
        return int(cursor.rowcount)

    def many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Run one statement once per parameter tuple."""
        for params in rows:
            self._connection.execute(self._sql(sql), params)


class Database:
    """An open database: `run(fn)` executes `fn(session)` as one transaction, in order."""

    def __init__(self, url: str, dialect: Dialect, connect: Callable[[], Any]) -> None:
        self.url = describe_url(url)
        self.dialect: Dialect = dialect
        self._connect = connect
        self._connection: Any = None
        self._lock_file: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-db")

    @classmethod
    async def open(cls, url: str) -> Database:
        """Connect to `url`, lock it (SQLite) and apply missing migrations.

        Raises:
            DatabaseError: unsupported URL, unreachable server, locked or newer database.
        """
        if url.startswith("sqlite:///"):
            database = cls._sqlite(url)
        elif url.startswith(("postgresql://", "postgres://")):
            database = cls(url, "postgresql", lambda: _connect_postgresql(url))
        else:
            raise DatabaseError(
                f"unsupported database URL {describe_url(url)[:60]!r}: use sqlite:///PATH or "
                "postgresql://USER@HOST/NAME"
            )
        try:
            await database.run(_migrate)
        except BaseException:
            await database.close()
            raise
        return database

    @classmethod
    def _sqlite(cls, url: str) -> Database:
        path = url.removeprefix("sqlite:///")
        if not path:
            raise DatabaseError("sqlite:/// needs a file path, e.g. sqlite:////srv/kiln/kiln.db")
        database = cls(url, "sqlite", lambda: _connect_sqlite(path))
        if path != ":memory:":
            file = Path(path)
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise DatabaseError(f"cannot create the folder of {file}: {error}") from None
            database._lock_file = _lock(file)
        return database

    async def run(self, fn: Callable[[Session], T]) -> T:
        """`fn(session)` in one transaction on the database thread; its result.

        Raises:
            DatabaseError: the database failed (the transaction was rolled back).
        """
        return await self.submit(fn)

    def submit(self, fn: Callable[[Session], T]) -> asyncio.Future[T]:
        """Queue `fn(session)` now, behind everything submitted before; await the result.

        Unlike `run`, the place in the queue is taken when this is called, not when the
        returned future is first awaited.
        """
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, self._transaction, fn)

    def _transaction(self, fn: Callable[[Session], T]) -> T:
        try:
            if self._connection is None:
                self._connection = self._connect()
            with self._begin() as session:
                return fn(session)
        except (sqlite3.Error, _postgres_errors()) as error:
            self._drop_if_broken()
            raise DatabaseError(f"database {self.url}: {error}") from error

    @contextlib.contextmanager
    def _begin(self) -> Iterator[Session]:
        connection = self._connection
        if self.dialect == "sqlite":
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield Session(connection, "sqlite")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        else:
            with connection.transaction():
                yield Session(connection, "postgresql")

    def _drop_if_broken(self) -> None:
        connection = self._connection
        if self.dialect == "postgresql" and connection is not None and connection.broken:
            with contextlib.suppress(Exception):
                connection.close()
            self._connection = None  # reconnect on the next call

    async def close(self) -> None:
        """Close the connection and release the SQLite lock (idempotent)."""

        def close() -> None:
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    self._connection.close()
                self._connection = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=True)
        if self._lock_file is not None:
            os.close(self._lock_file)  # closing the descriptor releases the flock
            self._lock_file = None


def _postgres_errors() -> type[Exception]:
    try:
        import psycopg
    except ImportError:  # only reachable when psycopg is not installed: SQLite only
        return sqlite3.Error
    return psycopg.Error


def _connect_sqlite(path: str) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA busy_timeout = 10000")
    if path != ":memory:":
        connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    return connection


def _connect_postgresql(url: str) -> Any:
    try:
        import psycopg
        from psycopg.rows import dict_row
    except ImportError:
        raise DatabaseError(
            "PostgreSQL needs the psycopg package: pip install 'psycopg[binary]'"
        ) from None
    try:
        return psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=10)
    except psycopg.Error as error:
        raise DatabaseError(f"cannot connect to {describe_url(url)}: {error}") from None


def _lock(file: Path) -> int:
    import fcntl

    lock_path = file.with_name(f"{file.name}.lock")
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        raise DatabaseError(
            f"the SQLite database {file} is in use by another gateway (it holds {lock_path}); "
            "give each gateway its own --database, or share predictions between replicas "
            "with --database postgresql://..."
        ) from None
    return descriptor


def _migrate(session: Session) -> None:
    if session.dialect == "postgresql":
        session.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
    session.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = session.one("SELECT MAX(version) AS version FROM schema_version")
    current = int(row["version"]) if row and row["version"] is not None else 0
    latest = MIGRATIONS[-1][0]
    if current > latest:
        raise DatabaseError(
            f"the database has schema version {current}, newer than this gateway's {latest}: "
            "upgrade the gateway"
        )
    types = _TYPES[session.dialect]
    for version, statements in MIGRATIONS:
        if version <= current:
            continue
        for statement in statements:
            session.execute(statement.format(**types))
        session.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        log.info("database schema migrated to version %d", version)

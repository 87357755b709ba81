"""Engines from a database URL or a file path: SQLite by default, PostgreSQL by URL."""
from __future__ import annotations

import logging
import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Self

import sqlalchemy as sa

from heron.store.closing import Closing

logger = logging.getLogger(__name__)


def database_url(url_or_path: str | os.PathLike[str]) -> sa.URL:
    """`sqlite:///x.db`, `postgresql://user@host/db`, ... as given; anything
    without `://` is the path of an SQLite file."""
    text = os.fspath(url_or_path)
    if "://" not in text:
        return sa.URL.create("sqlite", database=text)
    try:
        return sa.make_url(text)
    except sa.exc.ArgumentError as exc:
        raise ValueError(f"not a database URL: {text!r} ({exc})") from None


def sqlite_file(url: sa.URL) -> Path | None:
    """The file an SQLite URL names; None for other backends and in-memory databases."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.query.get("uri") == "true" and url.database.startswith("file:"):  # sqlite:///file:/x.db?mode=ro&uri=true
        uri = urllib.parse.urlsplit(url.database)
        return None if uri.path in ("", ":memory:") or "memory" in uri.query else Path(urllib.parse.unquote(uri.path))
    return Path(url.database)


SQLITE_BUSY_SECONDS = 60


def connect(url_or_path: str | os.PathLike[str], *, create: bool = True, what: str = "database") -> sa.Engine:
    """An engine for a URL or path. A new SQLite file (and its folder) is made
    when `create` is true, otherwise a missing one is a FileNotFoundError naming `what`."""
    url = database_url(url_or_path)
    file = sqlite_file(url)
    if file is not None and not file.exists():
        if not create:
            raise FileNotFoundError(f"no {what} at {file}")
        file.parent.mkdir(parents=True, exist_ok=True)
    try:  # a writer waits up to SQLITE_BUSY_SECONDS for another process's write transaction
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS} if file is not None else {})
    except sa.exc.ArgumentError as exc:  # an unknown dialect
        raise ValueError(f"cannot open {url.render_as_string()}: {exc}") from None
    except ImportError as exc:
        raise ValueError(f"cannot open {url.render_as_string()}: its driver is not installed ({exc}); "
                         f"for PostgreSQL, pip install 'psycopg[binary]'") from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _enforce_foreign_keys)
    return engine


def take_write_lock(conn: sa.Connection, table: sa.Table | None = None) -> None:
    """Begin a write transaction on SQLite holding its write lock from the start: two
    processes whose transactions both read, then both write, deadlock, and SQLite fails one
    at once ("database is locked") whatever the busy timeout; begun so, the second waits for
    the first (https://sqlite.org/lang_transaction.html). Call it first in the transaction.
    Other databases lock rows as they write; a transaction whose writes depend on what it
    read first names the `table` read, which PostgreSQL then locks against other writers
    (SHARE ROW EXCLUSIVE conflicts with itself, not with readers)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif table is not None and conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"LOCK TABLE {table.name} IN SHARE ROW EXCLUSIVE MODE")


def _require_tables(engine: sa.Engine, schema: sa.MetaData, what: str) -> None:
    present = set(sa.inspect(engine).get_table_names())
    missing = [name for name in schema.tables if name not in present]
    if missing:
        raise ValueError(f"{engine.url.render_as_string()}: holds no {what} (missing its tables {', '.join(missing)})")


def _create_missing_tables(engine: sa.Engine, schema: sa.MetaData) -> None:
    """Make the tables a database lacks, with their indexes and triggers, in one transaction
    that holds the write lock (`take_write_lock`) and looks again under it. Several processes
    opening a new database at once otherwise raced: one made a table between another's look
    and its CREATE, which then failed ("table ... already exists"), and on the consent store
    the loser's half-made schema kept the index that made the winner's CREATE INDEX fail
    before its append-only trigger was made. Looked up first without the lock, so opening a
    complete (or read-only) database writes nothing."""
    present = set(sa.inspect(engine).get_table_names())
    if all(name in present for name in schema.tables):
        return
    with engine.begin() as conn:
        take_write_lock(conn)
        schema.create_all(conn)  # checks each table again, now that no other process can write


def _create_missing_indexes(engine: sa.Engine, schema: sa.MetaData) -> None:
    """Indexes that a table gained after a database holding it was made: `create_all` makes a
    missing table with its indexes but passes over one that exists. Looked up first, so opening
    a current database writes nothing. An index only speeds lookups up, so one that cannot be
    made (a read-only database; PostgreSQL, where two processes adding it at once can collide
    despite IF NOT EXISTS) is left for a later open, with a warning."""
    inspector = sa.inspect(engine)
    missing = []
    for table in schema.tables.values():
        present = {index["name"] for index in inspector.get_indexes(table.name)}
        missing += [index for index in table.indexes if index.name not in present]
    for index in missing:
        try:
            with engine.begin() as conn:
                conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))
        except sa.exc.DBAPIError as err:
            logger.warning("%s: index %s not made (%s); lookups it serves scan instead",
                           engine.url.render_as_string(), index.name, err.orig)


def _enforce_foreign_keys(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    """SQLite checks foreign keys only when asked, once per connection
    (https://sqlite.org/foreignkeys.html#fk_enable)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


class EngineStore(Closing):
    """A store over one SQLAlchemy engine, opened from a URL or an SQLite path.

    Stores may share a database (their tables' names differ), so a database is
    this store's when it holds this store's tables, whatever else it holds."""

    what: ClassVar[str] = "database"  # named in errors: "no {what} at ...", "cannot open {what} ..."
    schema: ClassVar[sa.MetaData] = sa.MetaData()  # the store's tables

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url_or_path: str | os.PathLike[str], *, create: bool = True) -> Self:
        """The store at a database URL or an SQLite file path; ":memory:" is an in-memory SQLite database.

        With `create` the file and any missing tables and indexes are made (existing tables
        are never altered). Without it nothing is written: a missing file, or a database without
        this store's tables (an empty file, another store's database), is an error."""
        engine = connect(url_or_path, create=create, what=cls.what)
        try:
            if create:
                _create_missing_tables(engine, cls.schema)
                _create_missing_indexes(engine, cls.schema)
            else:
                _require_tables(engine, cls.schema, cls.what)
            return cls(engine)
        except sa.exc.DatabaseError as exc:  # unreachable server, not a database file, ...
            engine.dispose()
            raise ValueError(f"cannot open {cls.what} {engine.url.render_as_string()}: {exc.orig}") from None
        except BaseException:
            engine.dispose()
            raise

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string()  # password hidden

    @contextmanager
    def write_transaction(self, read_table: sa.Table | None = None) -> Iterator[sa.Connection]:
        """One write transaction, holding the write lock from its start (`take_write_lock`;
        `read_table`: the table whose rows decide what it writes). A refusal by the database
        (a broken foreign key or constraint) becomes a ValueError."""
        try:
            with self.engine.begin() as conn:
                take_write_lock(conn, read_table)
                yield conn
        except sa.exc.IntegrityError as exc:
            raise ValueError(f"refused by the database: {exc.orig}") from None

    def close(self) -> None:
        self.engine.dispose()

"""Opening the ledger's database: the URL, the engine and the schema migrated to head.

SQLite runs in WAL with a busy timeout, and its write transactions take the lock up front so two
writers queue instead of failing; PostgreSQL pings its pooled connections. `Ledger(url)` calls
`open_engine` then `migrate`; what it does with the database after that is in ledger.py.
"""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from orchestrator.ledger_errors import LedgerError
from orchestrator.redact import redact

BUSY_TIMEOUT_SECONDS = 60


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3 (the `postgres` extra's driver), not psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def parse_url(url: str) -> URL:
    """The URL as SQLAlchemy reads it (normalized), or a one-line LedgerError."""
    try:
        parsed = make_url(normalize_url(url))
    except ArgumentError:
        raise LedgerError(f"not a database URL: {redact(url)!r} (expected sqlite:///PATH or postgresql+psycopg://...)") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise LedgerError(f"unsupported ledger URL {parsed.render_as_string(hide_password=True)}: "
                          "the ledger runs on SQLite or PostgreSQL")
    return parsed


def open_engine(parsed: URL) -> Engine:
    display_url = parsed.render_as_string(hide_password=True)
    try:
        if parsed.get_backend_name() == "sqlite":
            return _sqlite_engine(parsed)
        return create_engine(parsed, pool_pre_ping=True)
    except NoSuchModuleError as e:
        raise LedgerError(f"unsupported ledger URL {display_url}: {e}") from None
    except ImportError as e:
        raise LedgerError(f"the ledger at {display_url} needs the {e.name} driver: pip install 'spotune[postgres]'") from None
    except OSError as e:
        raise LedgerError(f"cannot create the ledger's directory for {display_url}: {e.strerror}") from None


def _sqlite_engine(parsed: URL) -> Engine:
    database = parsed.database or ""
    if database and database != ":memory:":
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_SECONDS})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_SECONDS * 1000}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'DEFERRED')}")

    return engine


def migrate(write_engine: Engine, display_url: str) -> None:
    """Upgrade the schema to head in one transaction; a LedgerError if the database is newer or
    has orphan rows (the caller disposes of the engine)."""
    from orchestrator.migrations import NewerSchemaError, upgrade_to_head

    try:
        with write_engine.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                # Alembic rebuilds a SQLite table to change a column: it drops the old one, and with
                # foreign keys on, dropping a parent first deletes its rows, cascading to every child
                # table. SQLite's own procedure for schema changes: keys off outside the
                # transaction, checked before the commit.
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys = OFF")
            try:
                with conn.begin():
                    upgrade_to_head(conn)
                    if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                        raise LedgerError(f"the ledger at {display_url} has rows whose job is gone; "
                                          "not migrated (nothing changed)")
            finally:
                if sqlite:
                    conn.connection.dbapi_connection.execute("PRAGMA foreign_keys = ON")
    except NewerSchemaError as e:
        raise LedgerError(f"the ledger at {display_url} {e}") from None

"""The ledger schema's Alembic migrations, run from the installed package (no alembic.ini needed).

`upgrade_to_head(connection)` is what `Ledger(url)` calls. New revisions are written by hand in
versions/ (next number, `down_revision` = the current head); tests/test_ledger.py checks that the
migrated schema matches orchestrator/ledger_tables.py on SQLite and PostgreSQL.
"""
from __future__ import annotations

from pathlib import Path

SCRIPT_LOCATION = Path(__file__).resolve().parent
# Any constant works; it just has to be the same in every process that migrates.
_PG_MIGRATION_LOCK = 0x5307_7E0D


def alembic_config(connection=None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(connection):
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


class NewerSchemaError(RuntimeError):
    """The database was migrated by a newer spotune than this one."""


def upgrade_to_head(connection) -> None:
    """Migrate inside the caller's transaction. Concurrent openers wait for each other: SQLite via
    the write lock the caller's BEGIN IMMEDIATE holds, PostgreSQL via a transaction advisory lock."""
    from alembic import command

    if connection.dialect.name == "postgresql":
        from sqlalchemy import text

        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
    from alembic.script import ScriptDirectory

    current = current_revision(connection)
    scripts = ScriptDirectory.from_config(alembic_config())
    if current == scripts.get_current_head():
        return
    if current is not None and current not in {s.revision for s in scripts.walk_revisions()}:
        raise NewerSchemaError(f"has schema revision {current}, which this spotune does not know: upgrade spotune")
    command.upgrade(alembic_config(connection), "head")

"""Alembic environment: always given a connection by orchestrator.migrations (never reads a URL)."""
from alembic import context

from orchestrator.ledger_tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run ledger migrations through orchestrator.migrations.upgrade_to_head(connection)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite's ALTER TABLE is limited
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()

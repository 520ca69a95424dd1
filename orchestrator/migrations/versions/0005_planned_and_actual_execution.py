"""planned and actual execution config

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

The plan is what runs: each estimate keeps the execution config of the option the job was launched
on (micro-batch, gradient accumulation, gradient checkpointing, attention kernel, dtype, sharding),
and each attempt the config its recipe reported in its `start` event, so the ledger shows planned
against actual. Nullable: jobs recorded before this revision have neither, and estimates are
never rewritten, so they are not backfilled.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TABLES = ('estimates', 'attempts')


def _columns():
    return [sa.Column('micro_batch', sa.Integer(), nullable=True),
            sa.Column('grad_accum', sa.Integer(), nullable=True),
            sa.Column('gradient_checkpointing', sa.Boolean(), nullable=True),
            sa.Column('attention', sa.String(length=32), nullable=True),
            sa.Column('dtype', sa.String(length=16), nullable=True),
            sa.Column('sharding', sa.String(length=8), nullable=True)]


def upgrade() -> None:
    """Upgrade schema."""
    # Plain ADD COLUMN (no batch table copy): SQLite's estimates keep their never-rewritten trigger.
    for table in TABLES:
        for column in _columns():
            op.add_column(table, column)


def downgrade() -> None:
    """Downgrade schema."""
    for table in TABLES:
        for column in reversed(_columns()):
            op.drop_column(table, column.name)

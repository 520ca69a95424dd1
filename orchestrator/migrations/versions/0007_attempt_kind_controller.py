"""attempt kind: the backend's own machinery is a billed line of its own

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

A SkyPilot managed job runs under a jobs controller VM that is billed while it serves the job.
That cost is recorded as an attempt-like row (kind 'controller', attempt number 0), so every sum
over a job's attempts (the watcher's spend, the budget guard, `spotune status`, reconciliation)
includes it, while reconciliation and the report keep it apart from the attempts at training.
Existing rows are all attempts at training.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('attempts') as batch:
        batch.add_column(sa.Column('kind', sa.String(length=16), nullable=False, server_default='training'))


def downgrade() -> None:
    """Downgrade schema. Controller lines have no place in the old schema and are dropped."""
    op.execute("DELETE FROM attempts WHERE kind <> 'training'")
    with op.batch_alter_table('attempts') as batch:
        batch.drop_column('kind')

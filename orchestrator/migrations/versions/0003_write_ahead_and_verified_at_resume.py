"""write-ahead run dir, verified at resume, longer event names

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

- jobs.run_dir: where a job's run lives, recorded with the job before any process is started, so
  `resume`, `cancel` and `status` can find and settle a job whose launch was killed midway.
- checkpoints.verified becomes nullable: NULL until a resume has loaded the checkpoint (true) or
  skipped it (false). Existing rows meant "the directory existed when ingested", which says
  nothing about a resume: they become NULL.
- run_events.event widens to 32 characters: `checkpoint_skipped` is a ledger event now.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('run_dir', sa.Text(), nullable=True))
    with op.batch_alter_table('checkpoints') as batch:
        batch.alter_column('verified', existing_type=sa.Boolean(), nullable=True)
    op.execute("UPDATE checkpoints SET verified = NULL")
    with op.batch_alter_table('run_events') as batch:
        batch.alter_column('event', existing_type=sa.String(length=16), type_=sa.String(length=32),
                           existing_nullable=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.execute("DELETE FROM run_events WHERE length(event) > 16")
    with op.batch_alter_table('run_events') as batch:
        batch.alter_column('event', existing_type=sa.String(length=32), type_=sa.String(length=16),
                           existing_nullable=False)
    op.execute("UPDATE checkpoints SET verified = false WHERE verified IS NULL")
    with op.batch_alter_table('checkpoints') as batch:
        batch.alter_column('verified', existing_type=sa.Boolean(), nullable=False)
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('run_dir')

"""budget changes: a stopped job continued with more budget keeps the record of it

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

`spotune resume JOB --budget N` raises a job's budget (jobs.budget holds the one in force). Each
change is a row here, never rewritten: when, from what to what, what had been spent by then and
why, so the ledger still says what the job was first allowed to spend.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from orchestrator.ledger_tables import Money, UTCDateTime


# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('budget_changes',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=96), nullable=False),
    sa.Column('time', UTCDateTime(), nullable=False),
    sa.Column('old_budget', Money(), nullable=True),
    sa.Column('new_budget', Money(), nullable=True),
    sa.Column('spent', Money(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_budget_changes_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_budget_changes'))
    )
    with op.batch_alter_table('budget_changes') as batch:
        batch.create_index(batch.f('ix_budget_changes_job_id'), ['job_id'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('budget_changes') as batch:
        batch.drop_index(batch.f('ix_budget_changes_job_id'))
    op.drop_table('budget_changes')

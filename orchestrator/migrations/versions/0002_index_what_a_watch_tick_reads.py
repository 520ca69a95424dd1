"""index what a watch tick reads

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

A watch tick reads a job's latest rows, never all of them, so its cost stays flat however long the
job runs. These indexes make each of those reads a seek:

- run_events (job_id, event, offset): the latest `start`, the attempts that logged one, an
  attempt's `finished`, without walking the job's other lifecycle events.
- progress_samples (job_id, attempt, tokens): an attempt's max(tokens), which the ledger derives
  its trained tokens from on every ingest, without scanning the attempt's samples.

progress_samples' own job_id index goes: the unique (job_id, attempt, step) index and the new one
both lead with job_id, and every index is paid for on each of the job's many sample inserts.
"""
from typing import Sequence, Union

from alembic import op


# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_index('ix_run_events_job_id_event_offset', 'run_events', ['job_id', 'event', 'offset'], unique=False)
    op.create_index('ix_progress_samples_job_id_attempt_tokens', 'progress_samples', ['job_id', 'attempt', 'tokens'],
                    unique=False)
    op.drop_index('ix_progress_samples_job_id', table_name='progress_samples')


def downgrade() -> None:
    """Downgrade schema."""
    op.create_index('ix_progress_samples_job_id', 'progress_samples', ['job_id'], unique=False)
    op.drop_index('ix_progress_samples_job_id_attempt_tokens', table_name='progress_samples')
    op.drop_index('ix_run_events_job_id_event_offset', table_name='run_events')

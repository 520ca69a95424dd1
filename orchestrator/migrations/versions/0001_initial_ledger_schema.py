"""initial ledger schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-23

Jobs, their estimates (written once), attempts, checkpoints, progress samples, the recipe's
lifecycle events and the per-job events.jsonl read cursor.

Written out column by column as Alembic's autogenerate emits it: a migration is a frozen record
of the schema at that revision, so tables that share columns repeat them here on purpose
rather than sharing code that a later change could alter under an applied revision.

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from orchestrator.ledger_tables import Money, UTCDateTime


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


# The estimate a job was launched on is the baseline of its audit: the database itself refuses
# to change it, whoever connects.
_PG_GUARD = ("""
CREATE FUNCTION spotune_estimates_never_rewritten() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'estimates are never rewritten';
END;
$$ LANGUAGE plpgsql
""", """
CREATE TRIGGER estimates_never_rewritten BEFORE UPDATE ON estimates
    FOR EACH ROW EXECUTE FUNCTION spotune_estimates_never_rewritten()
""")
_SQLITE_GUARD = """
CREATE TRIGGER estimates_never_rewritten BEFORE UPDATE ON estimates
BEGIN
    SELECT RAISE(ABORT, 'estimates are never rewritten');
END
"""


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('jobs',
    sa.Column('id', sa.String(length=96), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('method', sa.String(length=16), nullable=False),
    sa.Column('spec_yaml', sa.Text(), nullable=False),
    sa.Column('spec_hash', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('backend', sa.String(length=32), nullable=False),
    sa.Column('budget', Money(), nullable=True),
    sa.Column('external_id', sa.String(length=200), nullable=True),
    sa.Column('failure_reason', sa.Text(), nullable=True),
    sa.Column('created_at', UTCDateTime(), nullable=False),
    sa.Column('updated_at', UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    op.create_index('ix_jobs_name', 'jobs', ['name'], unique=False)
    op.create_table('attempts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=96), nullable=False),
    sa.Column('n', sa.Integer(), nullable=False),
    sa.Column('provider', sa.String(length=64), nullable=False),
    sa.Column('region', sa.String(length=64), nullable=False),
    sa.Column('instance_type', sa.String(length=128), nullable=True),
    sa.Column('gpu', sa.String(length=64), nullable=False),
    sa.Column('gpu_count', sa.Integer(), nullable=False),
    sa.Column('spot', sa.Boolean(), nullable=False),
    sa.Column('price_per_hour', Money(), nullable=False),
    sa.Column('started_at', UTCDateTime(), nullable=False),
    sa.Column('ended_at', UTCDateTime(), nullable=True),
    sa.Column('end_reason', sa.String(length=16), nullable=True),
    sa.Column('external_id', sa.String(length=200), nullable=True),
    sa.Column('tokens', sa.BigInteger(), nullable=True),
    sa.Column('resumed_from_step', sa.Integer(), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_attempts_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_attempts')),
    sa.UniqueConstraint('job_id', 'n', name='uq_attempts_job_id_n')
    )
    op.create_index('ix_attempts_job_id', 'attempts', ['job_id'], unique=False)
    op.create_table('checkpoints',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=96), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=True),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.Column('verified', sa.Boolean(), nullable=False),
    sa.Column('time', UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_checkpoints_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_checkpoints')),
    sa.UniqueConstraint('job_id', 'attempt', 'step', name='uq_checkpoints_job_id_attempt_step')
    )
    op.create_index('ix_checkpoints_job_id', 'checkpoints', ['job_id'], unique=False)
    op.create_table('estimates',
    sa.Column('job_id', sa.String(length=96), nullable=False),
    sa.Column('plan_json', sa.Text(), nullable=False),
    sa.Column('chosen_rank', sa.Integer(), nullable=False),
    sa.Column('catalog_snapshot', sa.String(length=200), nullable=False),
    sa.Column('provider', sa.String(length=64), nullable=False),
    sa.Column('region', sa.String(length=64), nullable=False),
    sa.Column('instance_type', sa.String(length=128), nullable=False),
    sa.Column('gpu', sa.String(length=64), nullable=False),
    sa.Column('gpu_count', sa.Integer(), nullable=False),
    sa.Column('spot', sa.Boolean(), nullable=False),
    sa.Column('price_per_hour', Money(), nullable=False),
    sa.Column('tokens_per_second', sa.Float(), nullable=False),
    sa.Column('hours', sa.Float(), nullable=False),
    sa.Column('preemption_overhead_hours', sa.Float(), nullable=False),
    sa.Column('expected_cost', Money(), nullable=False),
    sa.Column('total_tokens', sa.BigInteger(), nullable=False),
    sa.Column('created_at', UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_estimates_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', name=op.f('pk_estimates'))
    )
    if op.get_bind().dialect.name == "postgresql":
        for statement in _PG_GUARD:
            op.execute(statement)
    else:
        op.execute(_SQLITE_GUARD)
    op.create_table('event_cursors',
    sa.Column('job_id', sa.String(length=96), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('offset', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_event_cursors_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', name=op.f('pk_event_cursors'))
    )
    op.create_table('progress_samples',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=96), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=True),
    sa.Column('loss', sa.Float(), nullable=True),
    sa.Column('lr', sa.Float(), nullable=True),
    sa.Column('tokens_per_second', sa.Float(), nullable=True),
    sa.Column('time', UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_progress_samples_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_progress_samples')),
    sa.UniqueConstraint('job_id', 'attempt', 'step', name='uq_progress_samples_job_id_attempt_step')
    )
    op.create_index('ix_progress_samples_job_id', 'progress_samples', ['job_id'], unique=False)
    op.create_table('run_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=96), nullable=False),
    sa.Column('offset', sa.BigInteger(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('event', sa.String(length=16), nullable=False),
    sa.Column('step', sa.Integer(), nullable=True),
    sa.Column('tokens', sa.BigInteger(), nullable=True),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('time', UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_run_events_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_run_events')),
    sa.UniqueConstraint('job_id', 'offset', name='uq_run_events_job_id_offset')
    )
    op.create_index('ix_run_events_job_id', 'run_events', ['job_id'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('ix_run_events_job_id', table_name='run_events')
    op.drop_table('run_events')
    op.drop_index('ix_progress_samples_job_id', table_name='progress_samples')
    op.drop_table('progress_samples')
    op.drop_table('event_cursors')
    op.execute("DROP TRIGGER IF EXISTS estimates_never_rewritten" + (" ON estimates" if op.get_bind().dialect.name == "postgresql" else ""))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS spotune_estimates_never_rewritten()")
    op.drop_table('estimates')
    op.drop_index('ix_checkpoints_job_id', table_name='checkpoints')
    op.drop_table('checkpoints')
    op.drop_index('ix_attempts_job_id', table_name='attempts')
    op.drop_table('attempts')
    op.drop_index('ix_jobs_name', table_name='jobs')
    op.drop_table('jobs')

"""user-given strings fit their columns

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

The spec takes a model as a Hugging Face id or a local path, and a path may be as long as the
kernel allows (contract.files.MAX_PATH_BYTES, 4096). The local backend's external id is its run
directory, under a --state-dir the user chooses. Both were VARCHAR(200): SQLite ignores the
length, PostgreSQL refuses the row, so a long path passed every test on SQLite and failed the
launch on PostgreSQL after the plan had been accepted.

- jobs.model: VARCHAR(4096), the longest model the spec accepts.
- jobs.external_id, attempts.external_id: TEXT; what a backend calls its run is the backend's.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('jobs') as batch:
        batch.alter_column('model', existing_type=sa.String(length=200), type_=sa.String(length=4096),
                           existing_nullable=False)
        batch.alter_column('external_id', existing_type=sa.String(length=200), type_=sa.Text(),
                           existing_nullable=True)
    with op.batch_alter_table('attempts') as batch:
        batch.alter_column('external_id', existing_type=sa.String(length=200), type_=sa.Text(),
                           existing_nullable=True)


def downgrade() -> None:
    """Downgrade schema. Values longer than 200 characters are cut: the old columns cannot hold them."""
    op.execute("UPDATE attempts SET external_id = substr(external_id, 1, 200) WHERE length(external_id) > 200")
    op.execute("UPDATE jobs SET external_id = substr(external_id, 1, 200) WHERE length(external_id) > 200")
    op.execute("UPDATE jobs SET model = substr(model, 1, 200) WHERE length(model) > 200")
    with op.batch_alter_table('attempts') as batch:
        batch.alter_column('external_id', existing_type=sa.Text(), type_=sa.String(length=200),
                           existing_nullable=True)
    with op.batch_alter_table('jobs') as batch:
        batch.alter_column('external_id', existing_type=sa.Text(), type_=sa.String(length=200),
                           existing_nullable=True)
        batch.alter_column('model', existing_type=sa.String(length=4096), type_=sa.String(length=200),
                           existing_nullable=False)

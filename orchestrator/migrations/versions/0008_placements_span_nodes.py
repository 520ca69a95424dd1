"""placements span nodes: num_nodes on estimates and attempts

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30

A multi-node job trains on num_nodes instances of one type; gpu_count stays the GPUs on each
node and price_per_hour is what all the nodes cost together. Every existing row ran on one node.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision: str = '0008'
down_revision: Union[str, Sequence[str], None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TABLES = ("estimates", "attempts")


def upgrade() -> None:
    """Upgrade schema."""
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column('num_nodes', sa.Integer(), nullable=False, server_default='1'))


def downgrade() -> None:
    """Downgrade schema. Rows of multi-node jobs keep their total price; the node count is dropped."""
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column('num_nodes')

"""ensemble scoring: a scoring job may average several runs

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 01:15:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('scoring_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('run_ids', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('scoring_jobs', schema=None) as batch_op:
        batch_op.drop_column('run_ids')

"""shard leases: a shard whose worker was lost is sent again after the lease grace

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 22:10:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'shard_leases',
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('shard', sa.Integer(), nullable=False),
        sa.Column('worker', sa.Text(), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['scoring_jobs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('job_id', 'shard'),
    )


def downgrade() -> None:
    op.drop_table('shard_leases')

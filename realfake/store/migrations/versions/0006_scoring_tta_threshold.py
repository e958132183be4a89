"""scoring jobs judge as evaluate does: flip TTA and a chosen cut-off

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 19:40:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('scoring_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tta', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('threshold', sa.Float(), server_default='0.5', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('scoring_jobs', schema=None) as batch_op:
        batch_op.drop_column('threshold')
        batch_op.drop_column('tta')

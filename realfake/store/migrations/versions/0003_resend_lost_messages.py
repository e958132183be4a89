"""resend lost messages

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 23:42:28.766858
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table('scoring_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('progress_at', sa.DateTime(timezone=True), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('scoring_jobs', schema=None) as batch_op:
        batch_op.drop_column('progress_at')

    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('enqueued_at')


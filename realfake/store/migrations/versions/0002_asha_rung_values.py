"""asha rung values

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 22:19:07.633568
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('rung_values',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sweep_id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('rung', sa.Integer(), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['sweep_id'], ['sweeps.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_id', 'rung')
    )
    with op.batch_alter_table('rung_values', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rung_values_sweep_id'), ['sweep_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('rung_values', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rung_values_sweep_id'))

    op.drop_table('rung_values')

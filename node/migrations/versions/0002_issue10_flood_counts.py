"""associations.occurrences: refused associations and rejected HTTP requests counted per
peer, reason and minute instead of one row each

Revision ID: 0002_issue10_flood_counts
Revises: 0002_issue14_settings_digest
"""
import sqlalchemy as sa
from alembic import op

revision = "0002_issue10_flood_counts"
down_revision = "0002_issue14_settings_digest"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("associations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("occurrences", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("associations", schema=None) as batch_op:
        batch_op.drop_column("occurrences")

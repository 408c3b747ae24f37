"""jobs.reason_code (stable code of a SKIPPED/FAILED reason) and jobs.header_repairs

Revision ID: 0002_issue8_reason_code
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002_issue8_reason_code"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("reason_code", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("header_repairs", sa.Text(), nullable=True))
        batch.create_index("ix_jobs_reason_code", ["reason_code"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_reason_code")
        batch.drop_column("header_repairs")
        batch.drop_column("reason_code")

"""workers: settings digest and why a worker cannot serve; fleet-wide metric counters

Revision ID: 0002_issue14_settings_digest
Revises: 0002_issue8_reason_code
"""
import sqlalchemy as sa
from alembic import op

revision = "0002_issue14_settings_digest"
down_revision = "0002_issue8_reason_code"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("settings_digest", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("serving_error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("serving_error_code", sa.String(length=32), nullable=True))
    op.create_table(
        "metric_counters",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("labels", sa.String(length=255), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", "labels"),
    )


def downgrade() -> None:
    op.drop_table("metric_counters")
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("serving_error_code")
        batch_op.drop_column("serving_error")
        batch_op.drop_column("settings_digest")

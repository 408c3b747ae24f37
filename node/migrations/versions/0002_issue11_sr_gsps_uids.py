"""jobs: UIDs of the TID 1500 SR and the GSPS written for a result

Revision ID: 0002_issue11_sr_gsps_uids
Revises: 0002_issue9_unique_jobs
"""
import sqlalchemy as sa
from alembic import op

revision = "0002_issue11_sr_gsps_uids"
down_revision = "0002_issue9_unique_jobs"
branch_labels = None
depends_on = None

_COLUMNS = ("sr_series_instance_uid", "sr_sop_instance_uid", "gsps_series_instance_uid", "gsps_sop_instance_uid")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for name in _COLUMNS:
            batch.add_column(sa.Column(name, sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for name in reversed(_COLUMNS):
            batch.drop_column(name)

"""jobs: one row per image (unique SOP Instance UID + pixel hash), lease token, claim time

Revision ID: 0002_issue9_unique_jobs
Revises: 0002_issue9_delivery_per_object
Create Date: 2026-12-01 09:10:00

Duplicate rows already there (the same instance with the same pixels accepted twice
by racing associations) are kept for the record, not deleted: the oldest row of each
group stays the job; every later one has its pixel_sha256 cleared (so it no longer
counts as that image), its reason set to "duplicate of job N", and, if it had not
finished, is marked SKIPPED so it does not produce a second set of outputs.
"""
import sqlalchemy as sa
from alembic import op

revision = '0002_issue9_unique_jobs'
down_revision = '0002_issue9_delivery_per_object'
branch_labels = None
depends_on = None

_LATER_DUPLICATES = (
    "SELECT j.id, (SELECT MIN(k.id) FROM jobs k WHERE k.sop_instance_uid = j.sop_instance_uid "
    "AND k.pixel_sha256 = j.pixel_sha256) AS first_id FROM jobs j WHERE j.pixel_sha256 IS NOT NULL"
)


def upgrade() -> None:
    bind = op.get_bind()
    later = [(row.id, row.first_id) for row in bind.execute(sa.text(_LATER_DUPLICATES)) if row.id != row.first_id]
    for job_id, first_id in later:
        bind.execute(
            sa.text("UPDATE jobs SET pixel_sha256 = NULL, error = :reason, status = CASE WHEN status IN "
                    "('DONE', 'SKIPPED', 'FAILED') THEN status ELSE 'SKIPPED' END, lease_until = NULL "
                    "WHERE id = :id"),
            {"id": job_id, "reason": f"duplicate of job {first_id} (same instance, same pixels; "
                                     "kept for the record by the upgrade to unique jobs)"},
        )
    # Plain ALTERs and a unique index: no table rebuild on SQLite.
    op.add_column('jobs', sa.Column('lease_token', sa.String(length=36), nullable=True))
    op.add_column('jobs', sa.Column('claimed_at', sa.DateTime(), nullable=True))
    op.create_index('uq_job_instance_pixels', 'jobs', ['sop_instance_uid', 'pixel_sha256'], unique=True)
    op.create_index('ix_jobs_claimed_at', 'jobs', ['claimed_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_jobs_claimed_at', table_name='jobs')
    op.drop_index('uq_job_instance_pixels', table_name='jobs')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('claimed_at')
        batch_op.drop_column('lease_token')

"""deliveries: one row per output object per destination

Revision ID: 0002_issue9_delivery_per_object
Revises: 0002_issue10_flood_counts
Create Date: 2026-12-01 09:00:00

Each (job, destination) row becomes one row per output object (SEG, SC) the job
wrote, with its own retry schedule. Existing rows are split: the row keeps the
job's SEG (or its SC when it has no SEG) and a copy with the same status and
attempts is added for the SC; rows of jobs that wrote no object carried nothing
to send and are dropped.
"""
import sqlalchemy as sa
from alembic import op

revision = '0002_issue9_delivery_per_object'
down_revision = '0002_issue10_flood_counts'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('object_kind', sa.String(length=8), nullable=False, server_default='SEG'))
        batch_op.add_column(sa.Column('sop_instance_uid', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('first_failed_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('next_attempt_at', sa.DateTime(), nullable=True))
        batch_op.drop_constraint('uq_delivery_job_destination', type_='unique')
        batch_op.create_unique_constraint('uq_delivery_job_destination_object', ['job_id', 'destination', 'object_kind'])
        batch_op.create_index(batch_op.f('ix_deliveries_status'), ['status'], unique=False)
    op.execute("DELETE FROM deliveries WHERE job_id IN (SELECT id FROM jobs WHERE seg_sop_instance_uid IS NULL "
               "AND sc_sop_instance_uid IS NULL)")
    op.execute("UPDATE deliveries SET object_kind = 'SC' WHERE job_id IN (SELECT id FROM jobs WHERE "
               "seg_sop_instance_uid IS NULL AND sc_sop_instance_uid IS NOT NULL)")
    op.execute(
        "INSERT INTO deliveries (job_id, destination, object_kind, status, attempts, last_error, delivered_at, "
        "instances_sent) SELECT d.job_id, d.destination, 'SC', d.status, d.attempts, d.last_error, d.delivered_at, "
        "CASE WHEN d.instances_sent > 0 THEN 1 ELSE 0 END FROM deliveries d JOIN jobs j ON j.id = d.job_id "
        "WHERE d.object_kind = 'SEG' AND j.seg_sop_instance_uid IS NOT NULL AND j.sc_sop_instance_uid IS NOT NULL"
    )
    op.execute("UPDATE deliveries SET instances_sent = 1 WHERE instances_sent > 1")
    op.execute("UPDATE deliveries SET sop_instance_uid = (SELECT CASE deliveries.object_kind WHEN 'SEG' THEN "
               "j.seg_sop_instance_uid ELSE j.sc_sop_instance_uid END FROM jobs j WHERE j.id = deliveries.job_id)")
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.alter_column('object_kind', existing_type=sa.String(length=8), server_default=None)


def downgrade() -> None:
    # Back to one row per (job, destination): keep the first object's row.
    op.execute("DELETE FROM deliveries WHERE id NOT IN (SELECT MIN(id) FROM deliveries GROUP BY job_id, destination)")
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deliveries_status'))
        batch_op.drop_constraint('uq_delivery_job_destination_object', type_='unique')
        batch_op.create_unique_constraint('uq_delivery_job_destination', ['job_id', 'destination'])
        batch_op.drop_column('next_attempt_at')
        batch_op.drop_column('first_failed_at')
        batch_op.drop_column('sop_instance_uid')
        batch_op.drop_column('object_kind')

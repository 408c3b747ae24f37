"""The sweeper: re-publishes jobs whose broker message was likely lost, and only those.

- never published (the broker was down when the image arrived): RECEIVED, no queued_at;
- a retry that fell due (a delivery backoff slot, a worker error) and was not published
  for that slot yet: the pipeline releases the job with ``next_attempt_at`` and the
  sweeper is what publishes it (no delayed messages held in a worker's memory);
- held by a worker that stopped renewing its lease (killed, machine lost), not
  published since the lease ran out;
- published long ago and still waiting, but only while the queue is stalled: no job is
  being worked on, none was claimed for ``requeue_after_s``, and a worker is alive. A
  long backlog being worked through is left alone (re-publishing it would flood the
  broker with duplicates); a message lost inside one is recovered once the rest drained.

Times come from the database's clock, as the leases do. A duplicate is harmless: the
task's claim fails and it does nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import DateTime, and_, exists, literal, or_, select

from node.config import NodeConfig
from node.db import Job, JobStatus, WorkerRecord, db_utcnow, get_sessionmaker
from node.periodic import PeriodicThread

__all__ = ["Sweeper", "jobs_to_requeue", "sweep_once"]

log = logging.getLogger(__name__)

# A worker heartbeat (every 15 s) at most this old means it is alive.
_WORKER_ALIVE_S = 60.0
_ACTIVE = (JobStatus.RUNNING, JobStatus.SENDING)


def _at(now: dt.datetime | None, offset_s: float = 0.0) -> Any:
    """A point in time on the database's clock (or at ``now``, for tests)."""
    if now is None:
        return db_utcnow(offset_s)
    return literal(now + dt.timedelta(seconds=offset_s), DateTime())


def jobs_to_requeue(config: NodeConfig, now: dt.datetime | None = None, limit: int = 500) -> list[int]:
    current = _at(now)
    stale = _at(now, -config.worker.requeue_after_s)
    # Give the intake's own enqueue a moment before duplicating it.
    grace = _at(now, -config.worker.sweep_interval_s)
    lease_free = or_(Job.lease_until.is_(None), Job.lease_until < current)
    due = or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= current)
    someone_working = exists().where(Job.status.in_(_ACTIVE), Job.lease_until.is_not(None), Job.lease_until >= current)
    claimed_lately = exists().where(Job.claimed_at.is_not(None), Job.claimed_at >= stale)
    worker_alive = exists().where(WorkerRecord.last_seen >= _at(now, -_WORKER_ALIVE_S))
    stalled = and_(~someone_working, ~claimed_lately, worker_alive)
    query = (
        select(Job.id)
        .where(
            or_(
                and_(Job.status == JobStatus.RECEIVED, Job.queued_at.is_(None), Job.received_at < grace),
                and_(Job.status.in_(_ACTIVE), lease_free, Job.next_attempt_at.is_not(None), due,
                     or_(Job.queued_at.is_(None), Job.queued_at < Job.next_attempt_at)),
                and_(Job.status.in_(_ACTIVE), Job.lease_until.is_not(None), Job.lease_until < current, due,
                     or_(Job.queued_at.is_(None), Job.queued_at < Job.lease_until)),
                and_(Job.status.in_([JobStatus.RECEIVED, JobStatus.QUEUED, *_ACTIVE]), lease_free, due,
                     Job.queued_at < stale, stalled),
            )
        )
        .order_by(Job.id)
        .limit(limit)
    )
    with get_sessionmaker(config.database_url)() as session:
        return list(session.scalars(query))


def sweep_once(config: NodeConfig) -> int:
    from node.broker import enqueue_jobs

    due = jobs_to_requeue(config)
    count = len(enqueue_jobs(config, due)) if due else 0
    if count:
        log.info("sweeper: re-enqueued %d job(s)", count)
    return count


class Sweeper(PeriodicThread):
    """`serve`'s sweeper: one `sweep_once` every ``worker.sweep_interval_s``."""

    def __init__(self, config: NodeConfig) -> None:
        super().__init__("sweeper", config.worker.sweep_interval_s, lambda: sweep_once(config))

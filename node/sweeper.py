"""The sweeper: re-enqueues jobs whose broker message was lost.

Cases it covers: the broker was down when the image arrived (row RECEIVED), a
message vanished with a killed worker (row QUEUED, or RUNNING/SENDING with an
expired lease), a delivery retry whose delayed message was lost (SENDING with
``next_attempt_at`` in the past). The task's claim makes a duplicate harmless.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from sqlalchemy import and_, or_, select

from node.config import NodeConfig
from node.db import Job, JobStatus, get_sessionmaker, utcnow

__all__ = ["Sweeper", "jobs_to_requeue", "sweep_once"]

log = logging.getLogger(__name__)


def jobs_to_requeue(config: NodeConfig, now: dt.datetime | None = None, limit: int = 500) -> list[int]:
    now = now or utcnow()
    stale = now - dt.timedelta(seconds=config.worker.requeue_after_s)
    # Give the intake's own enqueue a moment before duplicating it.
    grace = now - dt.timedelta(seconds=config.worker.sweep_interval_s)
    never_or_stale = or_(and_(Job.queued_at.is_(None), Job.received_at < grace), Job.queued_at < stale)
    query = (
        select(Job.id)
        .where(
            or_(
                # Never handed to the broker, or handed over long ago and not picked up.
                and_(Job.status.in_([JobStatus.RECEIVED, JobStatus.QUEUED]), never_or_stale),
                # A worker held it and stopped renewing its lease; a retry fell due.
                and_(
                    Job.status.in_([JobStatus.RUNNING, JobStatus.SENDING]),
                    or_(Job.lease_until.is_(None), Job.lease_until < now),
                    or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now),
                    or_(
                        Job.queued_at.is_(None),
                        Job.queued_at < stale,
                        and_(Job.lease_until.is_not(None), Job.queued_at < Job.lease_until),
                        and_(Job.next_attempt_at.is_not(None), Job.queued_at < Job.next_attempt_at),
                    ),
                ),
            )
        )
        .order_by(Job.id)
        .limit(limit)
    )
    with get_sessionmaker(config.database_url)() as session:
        return list(session.scalars(query))


def sweep_once(config: NodeConfig) -> int:
    from node.tasks import enqueue_jobs

    due = jobs_to_requeue(config)
    count = len(enqueue_jobs(config, due)) if due else 0
    if count:
        log.info("sweeper: re-enqueued %d job(s)", count)
    return count


class Sweeper:
    def __init__(self, config: NodeConfig) -> None:
        self._config = config
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._config.worker.sweep_interval_s):
            try:
                sweep_once(self._config)
            except Exception:
                log.exception("sweeper pass failed")

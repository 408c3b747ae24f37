"""A worker's hold on one job: claimed with a fresh token, renewed from the database's
clock, and required in the WHERE of every write the worker makes.

A worker whose lease was taken over (a pause longer than ``lease_s``, a network
partition, ``ptx-node resend`` on a live job) finds its writes match no row and stops
with ``LeaseLost`` instead of overwriting what the new holder did.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from node.config import NodeConfig
from node.db import Job, db_utcnow, get_sessionmaker, utcnow

__all__ = ["Lease", "LeaseKeeper", "LeaseLost", "claim", "hold"]

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another worker, or an admin, took the job over: stop without writing."""


@dataclass(frozen=True)
class Lease:
    job_id: int
    token: str

    def holds(self) -> Any:
        """SQL condition: the job row is still ours."""
        return and_(Job.id == self.job_id, Job.lease_token == self.token)

    def still_held(self, config: NodeConfig) -> None:
        """Raise ``LeaseLost`` unless the job is still ours (checked before talking to a PACS)."""
        with get_sessionmaker(config.database_url)() as session:
            if session.scalar(select(Job.id).where(self.holds())) is None:
                raise LeaseLost(f"job {self.job_id}: lease taken over")


def claim(config: NodeConfig, job_id: int, statuses: list[str], worker: str) -> Lease | None:
    """Take the job's lease if nobody holds it and its next attempt is due; None otherwise."""
    token = uuid.uuid4().hex
    with get_sessionmaker(config.database_url)() as session:
        result = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.status.in_(statuses),
                or_(Job.lease_until.is_(None), Job.lease_until < db_utcnow()),
                or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= db_utcnow(1.0)),
            )
            .values(lease_until=db_utcnow(config.worker.lease_s), lease_token=token, claimed_at=db_utcnow(),
                    worker=worker, next_attempt_at=None)
        )
        session.commit()
    return Lease(job_id, token) if result.rowcount == 1 else None


def hold(session: Session, lease: Lease) -> None:
    """Start a write transaction by touching our job row: it fails unless the lease is still
    ours, and locks the row (PostgreSQL) or the database (SQLite) against a takeover until commit."""
    result = session.execute(update(Job).where(lease.holds()).values(updated_at=utcnow()))
    if result.rowcount != 1:
        session.rollback()
        raise LeaseLost(f"job {lease.job_id}: lease taken over")


class LeaseKeeper:
    """Renews the lease while this process works on the job, but never past the task's
    time limit: a hung decoder or a trickling destination cannot hold a job forever."""

    def __init__(self, config: NodeConfig, lease: Lease) -> None:
        self._config = config
        self._lease = lease
        self._deadline = time.monotonic() + config.worker.task_time_limit_s
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        factory = get_sessionmaker(self._config.database_url)
        while not self._stop.wait(self._config.worker.heartbeat_s):
            if time.monotonic() >= self._deadline:
                log.warning("job %s: past the task time limit (%.0f s); no longer renewing its lease",
                            self._lease.job_id, self._config.worker.task_time_limit_s)
                return
            try:
                with factory() as session:
                    result = session.execute(update(Job).where(self._lease.holds())
                                             .values(lease_until=db_utcnow(self._config.worker.lease_s)))
                    session.commit()
                if result.rowcount != 1:
                    log.warning("job %s: lease taken over; its writes from here on are refused", self._lease.job_id)
                    self.lost.set()
                    return
            except Exception:
                log.exception("job %s: could not renew lease", self._lease.job_id)

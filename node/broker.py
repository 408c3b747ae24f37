"""The one Celery app, its one task decorator, and publishing a job's task.

The broker is a transport, not the source of truth: every job is a row, the task
is idempotent (it claims the row with a lease before any work), and the sweeper
re-enqueues rows whose message was lost (broker down at intake, worker killed).
Publishing goes by task name, so nothing here imports the task bodies (node.tasks).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from celery import Celery
from sqlalchemy import update

from node.config import NodeConfig
from node.db import Job, JobStatus, db_utcnow, get_sessionmaker, sqlite_file

__all__ = ["RUN_JOB", "app", "configure_app", "enqueue_job", "enqueue_jobs", "ptx_task"]

log = logging.getLogger(__name__)

# The task that runs one job (defined in node.tasks).
RUN_JOB = "ptx.run_job"

app = Celery("ptx_node")
_configured_for: str | None = None


def configure_app(config: NodeConfig) -> Celery:
    """Point the app at the configured broker (idempotent per broker URL)."""
    global _configured_for
    if _configured_for == config.broker_url:
        return app
    transport_options: dict[str, Any] = {}
    if config.broker_url.startswith("sqla+"):
        from kombu.transport import sqlalchemy as kombu_sqla

        # kombu hands these options to create_engine: wait on SQLite locks, don't fail.
        transport_options["connect_args"] = {"timeout": 30}
        # ...so the poll interval can't go there; the transport polls once a second by default.
        kombu_sqla.Transport.polling_interval = 0.05
        _sqlite_wal(config.broker_url.removeprefix("sqla+"))
    elif config.broker_url.startswith(("redis://", "rediss://")):
        # Redelivery of unacked messages after a worker vanished; the sweeper is faster.
        transport_options["visibility_timeout"] = 3600
    app.conf.update(
        broker_url=config.broker_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_default_queue=config.worker.queue,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_time_limit=config.worker.task_time_limit_s,
        task_soft_time_limit=0.9 * config.worker.task_time_limit_s,
        broker_pool_limit=2,
    )
    _configured_for = config.broker_url
    return app


def _sqlite_wal(url: str) -> None:
    """Put the broker's SQLite file in WAL mode (persistent in the file): one fsync per
    publish instead of the rollback journal's several, and readers never block writers."""
    import sqlite3

    path = sqlite_file(url)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


def ptx_task(**options: Any):
    """The project's only task decorator: late ack, requeue on worker loss, our queue."""
    defaults: dict[str, Any] = {
        "acks_late": True,
        "reject_on_worker_lost": True,
        "ignore_result": True,
        "max_retries": 0,
    }
    defaults.update(options)
    return app.task(**defaults)


def enqueue_job(config: NodeConfig, job_id: int) -> bool:
    """Publish the job's task; mark the row QUEUED. Never raises: the sweeper retries."""
    return bool(enqueue_jobs(config, [job_id]))


def enqueue_jobs(config: NodeConfig, job_ids: list[int]) -> list[int]:
    """Publish each job's task, then mark the published rows QUEUED in one commit.

    Returns the ids published. Never raises: rows left unpublished stay as they are and
    the sweeper publishes them once the broker answers again.
    """
    configure_app(config)
    published: list[int] = []
    for job_id in job_ids:
        try:
            app.send_task(
                RUN_JOB,
                kwargs={"job_id": job_id},
                retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
            )
        except Exception as exc:  # broker down: the sweeper re-enqueues
            log.warning("job %s: enqueue failed (%s); the sweeper will retry", job_id, type(exc).__name__)
            break
        published.append(job_id)
    if not published:
        return published
    try:
        factory = get_sessionmaker(config.database_url)
        with factory() as session:
            session.execute(update(Job).where(Job.id.in_(published)).values(queued_at=db_utcnow()))
            session.execute(
                update(Job)
                .where(Job.id.in_(published), Job.status == JobStatus.RECEIVED)
                .values(status=JobStatus.QUEUED)
            )
            session.commit()
    except Exception:
        log.exception("jobs %s: enqueued but could not mark QUEUED", published)
    return published

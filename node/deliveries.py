"""Delivery bookkeeping: every output object of a job, to every destination, on its own row.

A row is PENDING until its destination stored the object (DELIVERED), refused it for
good (REFUSED: no presentation context, SOP class not supported; never retried), or
kept failing for the whole retry window (FAILED). A failure waits for its slot on the
backoff schedule (``next_attempt_at``) while other objects and destinations go on.
The transport (C-STORE SCU, STOW-RS) is node.delivery.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from node.config import NodeConfig
from node.db import Delivery, DeliveryStatus, Job, database_now, get_sessionmaker
from node.lease import Lease, hold
from node.outputs.options import DELIVERY_ORDER as OUTPUT_ORDER

__all__ = [
    "DELIVERY_ORDER",
    "DeliveredObject",
    "DeliveryState",
    "OutputFiles",
    "deliver_pending",
    "delivery_state",
    "job_objects",
    "output_files",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveredObject:
    """A kind of DICOM object a job writes and delivers."""

    kind: str  # as stored in deliveries.object_kind
    filename: str  # in the job's output_dir
    uid_column: str  # the Job column holding its SOP Instance UID


# Delivery order, node.outputs.DELIVERY_ORDER: the SEG first (it is ready first, and the
# SR refers to it), the slow overlay last.
DELIVERY_ORDER: tuple[DeliveredObject, ...] = tuple(
    DeliveredObject(kind.upper(), f"{kind}.dcm", f"{kind}_sop_instance_uid") for kind in OUTPUT_ORDER
)


def job_objects(job: Job) -> list[tuple[DeliveredObject, Path]]:
    """The objects this job wrote (UID fixed, file on disk), in delivery order."""
    if not job.output_dir:
        return []
    base = Path(job.output_dir)
    found = []
    for obj in DELIVERY_ORDER:
        path = base / obj.filename
        if getattr(job, obj.uid_column, None) and path.exists():
            found.append((obj, path))
    return found


@dataclass(frozen=True)
class OutputFiles:
    seg: Path | None
    sc: Path | None
    png: Path | None
    sr: Path | None = None
    gsps: Path | None = None

    def path_of(self, kind: str) -> Path | None:
        return getattr(self, kind)


def output_files(job: Job) -> OutputFiles:
    base = Path(job.output_dir) if job.output_dir else None
    if base is None:
        return OutputFiles(None, None, None)
    written = {obj.kind.lower(): base / obj.filename if getattr(job, obj.uid_column) else None
               for obj in DELIVERY_ORDER}
    return OutputFiles(png=base / "overlay.png" if job.sc_sop_instance_uid else None, **written)


def deliver_pending(config: NodeConfig, lease: Lease, *, kinds: frozenset[str] | None = None) -> int:
    """Send every due object (of ``kinds``, default all) to every destination that lacks it,
    and record each answer on its row. Returns how many objects were stored. Raises
    ``LeaseLost`` (before sending or recording anything more) once the job is no longer ours."""
    from node.delivery import SendOutcome, send_objects

    job_id = lease.job_id
    factory = get_sessionmaker(config.database_url)
    configured = {d.name for d in config.destinations}
    due: dict[str, list[tuple[int, Path]]] = {}
    with factory() as session:
        hold(session, lease)
        now = database_now(session)  # retry slots are the database's times, not this machine's
        job = session.get(Job, job_id)
        assert job is not None
        objects = [(o, p) for o, p in job_objects(job) if kinds is None or o.kind in kinds]
        rows = {(d.destination, d.object_kind): d for d in job.deliveries}
        for dest in config.destinations:
            for obj, _path in objects:
                if (dest.name, obj.kind) not in rows:
                    row = Delivery(job_id=job_id, destination=dest.name, object_kind=obj.kind,
                                   sop_instance_uid=getattr(job, obj.uid_column), status=DeliveryStatus.PENDING,
                                   attempts=0, instances_sent=0)
                    session.add(row)
                    rows[(dest.name, obj.kind)] = row
        for row in rows.values():
            if row.status == DeliveryStatus.PENDING and row.destination not in configured:
                row.status = DeliveryStatus.FAILED
                row.last_error = f"destination {row.destination} is no longer configured"
        session.commit()
        for dest in config.destinations:
            for obj, path in objects:
                row = rows[(dest.name, obj.kind)]
                if row.status == DeliveryStatus.PENDING and (row.next_attempt_at is None or row.next_attempt_at <= now):
                    due.setdefault(dest.name, []).append((row.id, path))

    stored = 0
    for name, items in due.items():
        dest = config.destination(name)
        lease.still_held(config)
        results = send_objects(config, dest, [path for _row_id, path in items])
        for (row_id, path), result in zip(items, results, strict=True):
            if result.outcome == SendOutcome.STORED:
                stored += 1
                log.info("job %s: %s delivered to %s", job_id, path.name, name)
            else:
                log.warning("job %s: %s to %s %s: %s", job_id, path.name, name, result.outcome, result.reason)
            _record(config, lease, row_id, result.outcome, result.reason)
        if any(r.outcome == SendOutcome.FAILED for r in results):
            _metric_retry(name, config.database_url)
    return stored


def _record(config: NodeConfig, lease: Lease, row_id: int, outcome: str, reason: str | None) -> None:
    from node.delivery import SendOutcome

    with get_sessionmaker(config.database_url)() as session:
        hold(session, lease)
        now = database_now(session)
        row = session.get(Delivery, row_id)
        assert row is not None
        row.attempts += 1
        if outcome == SendOutcome.STORED:
            row.status = DeliveryStatus.DELIVERED
            row.delivered_at = now
            row.instances_sent = 1
            row.last_error = row.next_attempt_at = row.first_failed_at = None
        elif outcome == SendOutcome.REFUSED:
            row.status = DeliveryStatus.REFUSED
            row.last_error = reason
            row.next_attempt_at = None
        else:
            row.first_failed_at = row.first_failed_at or now
            failing_for = (now - row.first_failed_at).total_seconds()
            row.last_error = reason
            if config.delivery.gives_up(row.attempts, failing_for):
                row.status = DeliveryStatus.FAILED
                row.next_attempt_at = None
                tries = f"{row.attempts} attempt{'s' if row.attempts != 1 else ''}"
                row.last_error = f"{reason} (gave up after {tries} over {_duration(failing_for)})"
            else:
                row.next_attempt_at = now + dt.timedelta(seconds=config.delivery.backoff_s(row.attempts))
        session.commit()


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min {int(seconds % 60)} s"


@dataclass
class DeliveryState:
    """Where a job's deliveries stand, for its own status."""

    # Earliest retry of a delivery still waiting; None when none waits.
    next_attempt_at: dt.datetime | None = None
    waiting: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    delivered: int = 0


def delivery_state(config: NodeConfig, job_id: int) -> DeliveryState:
    state = DeliveryState()
    with get_sessionmaker(config.database_url)() as session:
        now = database_now(session)
        rows = session.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id))
        for row in rows:
            what = f"{row.object_kind} to {row.destination}"
            if row.status == DeliveryStatus.DELIVERED:
                state.delivered += 1
            elif row.status == DeliveryStatus.REFUSED:
                state.refused.append(f"{what} refused: {row.last_error}")
            elif row.status == DeliveryStatus.FAILED:
                state.failed.append(f"{what} failed: {row.last_error}")
            else:
                state.waiting.append(f"{what} waiting to retry: {row.last_error}" if row.last_error else what)
                at = row.next_attempt_at or now
                state.next_attempt_at = at if state.next_attempt_at is None else min(state.next_attempt_at, at)
    return state


def _metric_retry(destination: str, database_url: str) -> None:
    from node.metrics import inc_delivery_retry

    inc_delivery_retry(destination, database_url)

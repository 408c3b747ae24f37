"""Destination probes: a PACS that answers again gets its waiting deliveries at once.

While a destination has deliveries waiting for a retry, it is probed every
``delivery.probe_interval_s`` (C-ECHO for DIMSE, an HTTP request for STOW-RS). When it
answers, its waiting rows and their jobs fall due now instead of at their next backoff
slot, and the jobs are published straight away.
"""

from __future__ import annotations

import logging

from sqlalchemy import or_, select, update

from node.config import Destination, NodeConfig
from node.db import Delivery, DeliveryStatus, Job, JobStatus, db_utcnow, get_sessionmaker
from node.periodic import PeriodicThread

__all__ = ["DestinationProber", "probe_destination", "probe_once", "release_waiting"]

log = logging.getLogger(__name__)


def probe_destination(config: NodeConfig, dest: Destination) -> bool:
    """Whether the destination answers: C-ECHO Success, or any HTTP answer below 500."""
    timeout_s = min(config.delivery.timeout_s, 10.0)
    if dest.kind == "stow":
        import httpx

        try:
            response = httpx.get(dest.url or "", timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code < 500
    from pynetdicom.sop_class import Verification

    from node.delivery import open_association

    try:
        assoc = open_association(dest, [Verification], calling_ae_title=config.delivery.calling_ae_title,
                                 timeout_s=timeout_s)
    except Exception:  # refused, unreachable: down
        return False
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.get("Status", 0xFFFF)) == 0
    finally:
        if assoc.is_established:
            assoc.release()


def _waiting_destinations(config: NodeConfig) -> list[str]:
    """Destinations with deliveries waiting after a failure."""
    with get_sessionmaker(config.database_url)() as session:
        return list(session.scalars(
            select(Delivery.destination).distinct().where(
                Delivery.status == DeliveryStatus.PENDING, Delivery.first_failed_at.is_not(None),
                Delivery.next_attempt_at > db_utcnow())))


def release_waiting(config: NodeConfig, destination: str) -> list[int]:
    """Make the destination's waiting deliveries, and their jobs, due now; returns the job ids."""
    with get_sessionmaker(config.database_url)() as session:
        job_ids = list(session.scalars(
            select(Delivery.job_id).distinct().where(
                Delivery.destination == destination, Delivery.status == DeliveryStatus.PENDING,
                Delivery.next_attempt_at > db_utcnow())))
        if not job_ids:
            return []
        session.execute(update(Delivery).where(
            Delivery.destination == destination, Delivery.status == DeliveryStatus.PENDING,
            Delivery.job_id.in_(job_ids)).values(next_attempt_at=db_utcnow()))
        # Only jobs nobody holds: a worker holding one sees the rows due on its next pass.
        released = list(session.scalars(
            update(Job).where(Job.id.in_(job_ids), Job.status == JobStatus.SENDING,
                              or_(Job.lease_until.is_(None), Job.lease_until < db_utcnow()))
            .values(next_attempt_at=db_utcnow()).returning(Job.id)))
        session.commit()
    return sorted(released)


def probe_once(config: NodeConfig) -> dict[str, bool]:
    """Probe each destination with waiting deliveries; release those that answer."""
    from node.broker import enqueue_jobs

    answered: dict[str, bool] = {}
    for name in _waiting_destinations(config):
        try:
            dest = config.destination(name)
        except KeyError:
            continue
        answered[name] = probe_destination(config, dest)
        if answered[name]:
            job_ids = release_waiting(config, name)
            if job_ids:
                enqueue_jobs(config, job_ids)
                log.info("destination %s answers again: %d waiting job(s) released", name, len(job_ids))
    return answered


class DestinationProber(PeriodicThread):
    """`serve`'s prober: one `probe_once` every ``delivery.probe_interval_s`` (0: off)."""

    def __init__(self, config: NodeConfig) -> None:
        self._config = config
        super().__init__("destination probe", config.delivery.probe_interval_s, lambda: probe_once(config),
                         join_s=15)

    def start(self) -> None:
        if self._config.delivery.probe_interval_s > 0 and self._config.destinations:
            super().start()

"""Refused DIMSE associations and rejected HTTP requests, counted instead of logged one
row each: a caller retrying in a loop (or a scanner) must not grow the database without bound.

One ``associations`` row per protocol, peer address, reason and minute carries an
``occurrences`` count; past ``MAX_ROWS_PER_PEER_MINUTE`` distinct reasons from one peer in
one minute, further refusals are counted on that peer's latest row of the minute.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from node.db import Association, get_sessionmaker, utcnow
from node.metrics import count_event

__all__ = ["MAX_ROWS_PER_PEER_MINUTE", "record_refusal"]

log = logging.getLogger(__name__)

MAX_ROWS_PER_PEER_MINUTE = 8


def record_refusal(
    database_url: str,
    *,
    protocol: str,
    peer_address: str | None,
    peer_port: int | None,
    calling_ae: str | None,
    called_ae: str | None,
    reason: str,
    now: dt.datetime | None = None,
) -> int | None:
    """Count one refusal; returns the id of the row that holds it (None if the database failed)."""
    now = now or utcnow()
    minute = now.replace(second=0, microsecond=0)
    peer = (peer_address or None) and peer_address[:64]
    peer_match = Association.peer_address.is_(None) if peer is None else Association.peer_address == peer
    try:
        with get_sessionmaker(database_url)() as session:
            this_minute = (
                select(Association.id, Association.reject_reason)
                .where(Association.protocol == protocol, Association.accepted.is_(False), peer_match,
                       Association.started_at >= minute)
                .order_by(Association.id.desc())
                .limit(MAX_ROWS_PER_PEER_MINUTE)
            )
            rows = session.execute(this_minute).all()
            target = next((r.id for r in rows if r.reject_reason == reason), None)
            if target is None and len(rows) >= MAX_ROWS_PER_PEER_MINUTE:
                target = rows[0].id
            # The fleet-wide counter still counts every refusal, in the same transaction.
            count_event(session.connection(), "ptx_associations_total", {"protocol": protocol, "accepted": "false"})
            if target is not None:
                session.execute(
                    update(Association).where(Association.id == target)
                    .values(occurrences=Association.occurrences + 1, ended_at=now)
                )
                session.commit()
                return target
            row = Association(
                protocol=protocol, calling_ae=(calling_ae or None) and calling_ae[:16],
                called_ae=(called_ae or None) and called_ae[:16], peer_address=peer, peer_port=peer_port,
                started_at=now, ended_at=now, accepted=False, reject_reason=reason,
                instances_accepted=0, instances_rejected=0, occurrences=1,
            )
            session.add(row)
            session.commit()
            return row.id
    except SQLAlchemyError:
        log.exception("could not record a refused %s request", protocol)
        return None

"""The job database: tables admins read with plain SQL, one engine and session
factory per process, and the schema applied through Alembic migrations.

Tables:
- ``jobs``: one row per received instance, its status and timings, the result
  summary, the UIDs of the SEG/SC written and the model that made them;
- ``deliveries``: one row per (job, destination), so a retry never sends twice to
  a destination that already has the outputs;
- ``associations``: every DICOM association and STOW-RS request.
"""

from __future__ import annotations

import datetime as dt
import enum
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

__all__ = [
    "Association",
    "Base",
    "Delivery",
    "DeliveryStatus",
    "Job",
    "JobStatus",
    "TERMINAL_STATUSES",
    "WorkerRecord",
    "get_engine",
    "get_sessionmaker",
    "migrate",
    "utcnow",
]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class JobStatus(enum.StrEnum):
    RECEIVED = "RECEIVED"  # spooled and committed, not yet handed to the broker
    QUEUED = "QUEUED"  # handed to the broker
    RUNNING = "RUNNING"  # a worker holds the lease and is running the model
    SENDING = "SENDING"  # outputs written, delivery in progress or waiting for a retry
    DONE = "DONE"
    SKIPPED = "SKIPPED"  # not a frontal chest radiograph; reason in `error`
    FAILED = "FAILED"  # reason in `error`


TERMINAL_STATUSES = frozenset({JobStatus.DONE, JobStatus.SKIPPED, JobStatus.FAILED})


class DeliveryStatus(enum.StrEnum):
    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default=JobStatus.RECEIVED)
    # Where the image came from.
    source: Mapped[str] = mapped_column(String(8), default="dimse")  # dimse | stow
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    calling_host: Mapped[str | None] = mapped_column(String(64))
    # What it is (no patient name; the patient ID only as a salted hash prefix).
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str | None] = mapped_column(String(64))
    patient_id_hash: Mapped[str | None] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(16))
    view_position: Mapped[str | None] = mapped_column(String(16))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    pixel_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    spool_path: Mapped[str | None] = mapped_column(Text)
    # Timings.
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    queued_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    # Work bookkeeping.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)
    # Result summary.
    positive: Mapped[bool | None] = mapped_column(Boolean)
    max_probability: Mapped[float | None] = mapped_column(Float)
    area_px: Mapped[int | None] = mapped_column(Integer)
    area_mm2: Mapped[float | None] = mapped_column(Float)
    n_components: Mapped[int | None] = mapped_column(Integer)
    inference_ms: Mapped[float | None] = mapped_column(Float)
    # Outputs written (UIDs fixed before the files, so a re-run re-sends the same instances).
    output_dir: Mapped[str | None] = mapped_column(Text)
    seg_series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    seg_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sc_series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sc_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    # Model that made them.
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    untrained: Mapped[bool | None] = mapped_column(Boolean)

    deliveries: Mapped[list[Delivery]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Delivery.id"
    )

    def summary(self) -> dict[str, Any]:
        """The row as plain data for the CLI and the status page."""
        out = {c.name: getattr(self, c.name) for c in self.__table__.columns}
        for key, value in out.items():
            if isinstance(value, dt.datetime):
                out[key] = value.isoformat(timespec="milliseconds") + "Z"
        out["deliveries"] = [d.summary() for d in self.deliveries]
        return out


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("job_id", "destination", name="uq_delivery_job_destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    instances_sent: Mapped[int] = mapped_column(Integer, default=0)

    job: Mapped[Job] = relationship(back_populates="deliveries")

    def summary(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "status": self.status,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "delivered_at": self.delivered_at.isoformat(timespec="milliseconds") + "Z"
            if self.delivered_at
            else None,
            "instances_sent": self.instances_sent,
        }


class Association(Base):
    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    protocol: Mapped[str] = mapped_column(String(8), default="dimse")  # dimse | stow
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    peer_port: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    accepted: Mapped[bool] = mapped_column(Boolean, default=True)
    reject_reason: Mapped[str | None] = mapped_column(Text)
    instances_accepted: Mapped[int] = mapped_column(Integer, default=0)
    instances_rejected: Mapped[int] = mapped_column(Integer, default=0)

    def summary(self) -> dict[str, Any]:
        out = {c.name: getattr(self, c.name) for c in self.__table__.columns}
        for key, value in out.items():
            if isinstance(value, dt.datetime):
                out[key] = value.isoformat(timespec="milliseconds") + "Z"
        return out


class WorkerRecord(Base):
    """A worker process's heartbeat, for the status page (workers alive, device)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)  # hostname:pid
    device: Mapped[str | None] = mapped_column(String(32))
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    jobs_done: Mapped[int] = mapped_column(Integer, default=0)


_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker] = {}
_lock = threading.Lock()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the SCP insert while workers read; FULL sync makes a commit durable.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def get_engine(url: str) -> Engine:
    """The process's one engine for ``url``."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            if url.startswith("sqlite"):
                path = url.split(":///", 1)[1] if ":///" in url else ""
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
                event.listen(engine, "connect", _sqlite_pragmas)
            else:
                engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
            _engines[url] = engine
        return engine


def get_sessionmaker(url: str) -> sessionmaker:
    with _lock:
        factory = _sessionmakers.get(url)
    if factory is None:
        factory = sessionmaker(bind=get_engine(url), expire_on_commit=False)
        with _lock:
            _sessionmakers.setdefault(url, factory)
            factory = _sessionmakers[url]
    return factory


def dispose_engines() -> None:
    """Forget engines (after fork: a child must not reuse its parent's connections)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)
        _engines.clear()
        _sessionmakers.clear()


def migrate(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` to ``revision`` with Alembic."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    with get_engine(url).begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)

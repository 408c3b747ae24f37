"""The job database: tables admins read with plain SQL, one engine and session
factory per process, and the schema applied through Alembic migrations.

Tables:
- ``jobs``: one row per received instance, its status and timings, the result
  summary, the UIDs of the SEG/SR/GSPS/SC written and the model that made them;
- ``deliveries``: one row per (job, output object, destination) with its own status,
  attempts and reason, so a retry only sends what a destination does not have yet;
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
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker
from sqlalchemy.sql.functions import FunctionElement

__all__ = [
    "Association",
    "Base",
    "Delivery",
    "DeliveryStatus",
    "Job",
    "JobStatus",
    "MetricCounter",
    "TERMINAL_STATUSES",
    "WorkerRecord",
    "database_now",
    "db_utcnow",
    "get_engine",
    "get_sessionmaker",
    "migrate",
    "sqlite_file",
    "upsert_insert",
    "utcnow",
]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class db_utcnow(FunctionElement):  # noqa: N801 (an SQL function, named like one)
    """The database's clock in UTC, plus ``offset_s`` seconds, as a naive DATETIME.

    Leases are compared across machines, so they are read from the one clock they share.
    """

    type = DateTime()
    inherit_cache = True

    def __init__(self, offset_s: float = 0.0) -> None:
        from sqlalchemy import literal

        super().__init__(literal(float(offset_s)))


def database_now(session: Any) -> dt.datetime:
    """The database's clock now (naive UTC), for times that another machine compares with
    ``db_utcnow``: retry slots the sweeper and the claim read, as well as leases."""
    return session.scalar(select(db_utcnow()))


@compiles(db_utcnow, "sqlite")
def _db_utcnow_sqlite(element: db_utcnow, compiler: Any, **kw: Any) -> str:
    (offset,) = element.clauses
    # Same text form as SQLAlchemy writes for SQLite DateTime (it sorts as a string).
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', ({compiler.process(offset, **kw)}) || ' seconds')"


@compiles(db_utcnow, "postgresql")
def _db_utcnow_postgresql(element: db_utcnow, compiler: Any, **kw: Any) -> str:
    (offset,) = element.clauses
    return (f"((statement_timestamp() AT TIME ZONE 'UTC') + "
            f"make_interval(secs => CAST({compiler.process(offset, **kw)} AS double precision)))")


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
    PENDING = "PENDING"  # to send, or waiting for its next attempt (next_attempt_at)
    DELIVERED = "DELIVERED"
    REFUSED = "REFUSED"  # the destination will never take it (SOP class not supported); not retried
    FAILED = "FAILED"  # retries given up; reason in last_error


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"
    # "The same image": same SOP Instance, same pixels (a re-sent instance with new pixels is a new job).
    __table_args__ = (Index("uq_job_instance_pixels", "sop_instance_uid", "pixel_sha256", unique=True),)

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
    # Fencing: a claim writes a new token; every worker write requires it in its WHERE.
    lease_token: Mapped[str | None] = mapped_column(String(36))
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, index=True)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)  # the reason's sentence (node.reasons)
    reason_code: Mapped[str | None] = mapped_column(String(32), index=True)  # node.reasons.ReasonCode
    # What node.outputs.sanitize changed in the source header (attribute names, no values).
    header_repairs: Mapped[str | None] = mapped_column(Text)
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
    sr_series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    gsps_series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    gsps_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
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
    """One output object of a job (its SEG, its SC, ...) on its way to one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("job_id", "destination", "object_kind", name="uq_delivery_job_destination_object"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    # Which output: SEG, SC, ... (node.deliveries.DELIVERY_ORDER).
    object_kind: Mapped[str] = mapped_column(String(8))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    # Start of the current run of failures (the retry window counts from here).
    first_failed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    instances_sent: Mapped[int] = mapped_column(Integer, default=0)

    job: Mapped[Job] = relationship(back_populates="deliveries")

    def summary(self) -> dict[str, Any]:
        def iso(value: dt.datetime | None) -> str | None:
            return value.isoformat(timespec="milliseconds") + "Z" if value else None

        return {
            "destination": self.destination,
            "object_kind": self.object_kind,
            "sop_instance_uid": self.sop_instance_uid,
            "status": self.status,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "first_failed_at": iso(self.first_failed_at),
            "next_attempt_at": iso(self.next_attempt_at),
            "delivered_at": iso(self.delivered_at),
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
    # Refusals this row stands for: one row per peer, reason and minute (node.refusals).
    occurrences: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

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
    # Digest of the settings node and workers must share (NodeConfig.shared_settings_digest).
    settings_digest: Mapped[str | None] = mapped_column(String(64))
    # Set when the worker could not start serving (no CUDA, bad checkpoint): the reason, in words.
    serving_error: Mapped[str | None] = mapped_column(Text)
    serving_error_code: Mapped[str | None] = mapped_column(String(32))


class MetricCounter(Base):
    """A fleet-wide Prometheus counter: incremented where the event happens, never
    decremented, so `_total` figures survive job-row pruning and `resend`."""

    __tablename__ = "metric_counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Label values as sorted `key=value` pairs joined by "," ("" for none).
    labels: Mapped[str] = mapped_column(String(255), primary_key=True, default="")
    value: Mapped[float] = mapped_column(Float, default=0.0)


_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker] = {}
_lock = threading.Lock()


def sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL; None for another database or an in-memory one."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def upsert_insert(bind: Any, table: Any) -> Any:
    """An INSERT that has ``on_conflict_do_nothing/update`` for the bind's dialect (SQLite and
    PostgreSQL, the two the node supports)."""
    if bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


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


def migrate(url: str, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the schema at ``url`` to ``revision`` with Alembic; returns the revisions
    before and after (before is None for an empty database)."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    engine = get_engine(url)
    with engine.connect() as connection:
        sqlite = engine.dialect.name == "sqlite"
        if sqlite:
            # Batch migrations rebuild SQLite tables; dropping `jobs` must not cascade into `deliveries`.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                before = MigrationContext.configure(connection).get_current_revision()
                cfg.attributes["connection"] = connection
                command.upgrade(cfg, revision)
                after = MigrationContext.configure(connection).get_current_revision()
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()
    return before, after

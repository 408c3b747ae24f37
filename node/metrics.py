"""Prometheus metrics.

What the node's ``/metrics`` serves (every family is listed, with type and labels, in
deploy/README.md "Monitoring"; a test keeps the two in step):

- ``DatabaseCollector``: fleet-wide figures read from the job database at scrape time.
  Levels are gauges (jobs by status, queue depth, workers alive / able to serve).
  Counters (``*_total``) come from the ``metric_counters`` table, which the process where
  the event happens increments (``count_event``) and nothing decrements: they survive
  restarts, ``resend`` and the pruning of job rows. The latency histograms are computed
  over the job rows present.
- The node process's own registry: STOW-RS instances it received
  (``ptx_stow_instances_total``), which restarts from 0 with the node.
- A worker process's own registry (``observe_stage``, ``observe_inference``): exposed
  only by that worker with ``start_metrics_server(port)``, never by the node, whose copy
  would read 0 (inference happens in the workers).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import start_http_server as _prometheus_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import Float, case, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

from node.config import NodeConfig
from node.db import (
    Delivery,
    Job,
    JobStatus,
    MetricCounter,
    WorkerRecord,
    get_engine,
    get_sessionmaker,
    upsert_insert,
    utcnow,
)
from node.reasons import first_line

__all__ = [
    "CONTENT_TYPE",
    "INFERENCE_BUCKETS_S",
    "JOB_STAGES",
    "STAGE_BUCKETS_S",
    "SpoolSpaceCollector",
    "WORKER_ALIVE_S",
    "DatabaseCollector",
    "count_event",
    "inc_delivery_retry",
    "inc_stow_instance",
    "node_registry",
    "observe_inference",
    "observe_stage",
    "process_registry",
    "render",
    "seconds_between",
    "start_metrics_server",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# `*_created` gauges next to every counter are undocumented noise for an alerting user.
disable_created_metrics()
STAGE_BUCKETS_S: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
INFERENCE_BUCKETS_S: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
# A worker whose heartbeat is older than this is not counted as alive.
WORKER_ALIVE_S = 60.0
# A worker that could not serve keeps counting this long (a supervisor retries within it).
UNABLE_WINDOW_S = 600.0

# Fleet-wide counters in the metric_counters table: name -> (help, label names).
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ptx_jobs_received_total": ("Instances received and recorded as new jobs, by source (dimse, stow).", ("source",)),
    "ptx_jobs_failed_total": ("Jobs that ended FAILED (worker or delivery gave up).", ()),
    "ptx_delivery_retries_total": ("Failed delivery attempts by destination (each is retried for "
                                   "delivery.retry_window_s).", ("destination",)),
    "ptx_associations_total": ("DICOM associations and STOW-RS requests, refused ones included.",
                               ("protocol", "accepted")),
    "ptx_worker_start_failures_total": ("Worker starts that ended because the worker cannot serve, by reason.",
                                        ("reason",)),
}

# Stage name -> (later timestamp, earlier timestamp) on the job row.
JOB_STAGES: dict[str, tuple[str, str]] = {
    "queue": ("started_at", "received_at"),  # waiting for a worker
    "process": ("finished_at", "started_at"),  # model and outputs
    "delivery": ("delivered_at", "finished_at"),  # sending to every destination
    "total": ("delivered_at", "received_at"),  # image in to outputs stored at the PACS
}


# ---------------------------------------------------------------------------
# process-local registry and the helpers the pipeline calls


def _new_process_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    return registry


# Metrics live in the default-free registry below so tests and several app
# instances in one process never collide on names.
_PROCESS_REGISTRY = CollectorRegistry(auto_describe=True)
_STAGE = Histogram(
    "ptx_worker_stage_seconds",
    "Time spent in a pipeline stage, observed by this process.",
    ["stage"],
    buckets=STAGE_BUCKETS_S,
    registry=_PROCESS_REGISTRY,
)
_INFERENCE = Histogram(
    "ptx_worker_inference_seconds",
    "Model inference time per image (with TTA), observed by this process.",
    buckets=INFERENCE_BUCKETS_S,
    registry=_PROCESS_REGISTRY,
)
_DELIVERY_RETRIES = Counter(
    "ptx_worker_delivery_retries",
    "Delivery attempts after the first, by destination, made by this process.",
    ["destination"],
    registry=_PROCESS_REGISTRY,
)
# The node process's own figures (what it observes itself), served by its /metrics.
_NODE_REGISTRY = CollectorRegistry(auto_describe=True)
_STOW_INSTANCES = Counter(
    "ptx_stow_instances",
    "Instances received through STOW-RS by this node process since it started, by outcome.",
    ["outcome"],
    registry=_NODE_REGISTRY,
)


def observe_stage(stage: str, seconds: float) -> None:
    """Record how long a pipeline stage took (e.g. "load", "inference", "outputs", "delivery")."""
    if not stage:
        raise ValueError("stage must be a non-empty string")
    _STAGE.labels(stage=stage).observe(max(0.0, float(seconds)))


def observe_inference(seconds: float) -> None:
    _INFERENCE.observe(max(0.0, float(seconds)))


def inc_delivery_retry(destination: str, database_url: str | None = None) -> None:
    _DELIVERY_RETRIES.labels(destination=destination).inc()
    if database_url:
        count_event(database_url, "ptx_delivery_retries_total", {"destination": destination})


def inc_stow_instance(outcome: str) -> None:
    _STOW_INSTANCES.labels(outcome=outcome).inc()


def _label_key(labels: dict[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))


def _label_values(key: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in key.split(",")) if key else {}


def count_event(target: str | Connection, name: str, labels: dict[str, str] | None = None, amount: float = 1) -> None:
    """Add ``amount`` to a fleet-wide counter. ``target``: a database URL (own transaction,
    never raises) or a connection (joins its transaction, so the count commits with the
    event it counts). One upsert, safe against concurrent first increments."""
    if not name.endswith("_total"):
        raise ValueError(f"counter names end in _total, got {name!r}")
    values = {"name": name, "labels": _label_key(labels), "value": float(amount)}

    def upsert(connection: Connection) -> None:
        statement = upsert_insert(connection, MetricCounter).values(**values)
        connection.execute(statement.on_conflict_do_update(
            index_elements=["name", "labels"], set_={"value": MetricCounter.value + statement.excluded.value}))

    if isinstance(target, Connection):
        upsert(target)
        return
    try:
        with get_engine(target).begin() as connection:
            upsert(connection)
    except Exception as exc:  # a lost count must not fail the job that it counts
        import logging

        logging.getLogger(__name__).warning("could not count %s: %s", name, first_line(exc))


def process_registry() -> CollectorRegistry:
    """This process's metrics (all processes of the machine under PROMETHEUS_MULTIPROC_DIR)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return _new_process_registry()
    return _PROCESS_REGISTRY


def start_metrics_server(port: int, addr: str = "127.0.0.1") -> None:
    """Expose this process's metrics on ``http://addr:port/metrics`` (for a worker)."""
    _prometheus_http_server(port, addr=addr, registry=process_registry())


# ---------------------------------------------------------------------------
# figures computed from the database at scrape time


class seconds_between(FunctionElement):  # noqa: N801 (a SQL function, named like one)
    """``later - earlier`` in seconds, in the SQL dialect at hand."""

    type = Float()
    name = "seconds_between"
    inherit_cache = True


@compiles(seconds_between)
def _seconds_between_default(element: seconds_between, compiler, **kw) -> str:  # PostgreSQL
    later, earlier = (compiler.process(c, **kw) for c in element.clauses)
    return f"EXTRACT(EPOCH FROM ({later} - {earlier}))"


@compiles(seconds_between, "sqlite")
def _seconds_between_sqlite(element: seconds_between, compiler, **kw) -> str:
    later, earlier = (compiler.process(c, **kw) for c in element.clauses)
    # Rounded to the millisecond: julianday() doubles would put 5.000 s just above the 5 s bucket.
    return f"(ROUND((julianday({later}) - julianday({earlier})) * 86400000.0) / 1000.0)"


@compiles(seconds_between, "mysql")
def _seconds_between_mysql(element: seconds_between, compiler, **kw) -> str:
    later, earlier = (compiler.process(c, **kw) for c in element.clauses)
    return f"(TIMESTAMPDIFF(MICROSECOND, {earlier}, {later}) / 1000000.0)"


def _histogram_columns(value: ColumnElement, buckets: Sequence[float], label: str) -> list[ColumnElement]:
    """Cumulative bucket counts, count and sum of ``value`` (NULLs ignored) as SQL aggregates."""
    columns = [func.sum(case((value <= bound, 1), else_=0)).label(f"{label}_le_{i}") for i, bound in enumerate(buckets)]
    columns.append(func.count(value).label(f"{label}_count"))
    columns.append(func.sum(value).label(f"{label}_sum"))
    return columns


def _stage_value(stage: str) -> ColumnElement:
    later, earlier = (getattr(Job, name) for name in JOB_STAGES[stage])
    seconds = seconds_between(later, earlier)
    # Rows missing a timestamp, or with clocks that disagree, are left out.
    return case((later.is_not(None) & earlier.is_not(None) & (seconds >= 0), seconds), else_=None)


def _bucket_pairs(row: Sequence, offset: int, buckets: Sequence[float]) -> tuple[list[tuple[str, float]], float]:
    counts = [int(row[offset + i] or 0) for i in range(len(buckets))]
    total = int(row[offset + len(buckets)] or 0)
    value_sum = float(row[offset + len(buckets) + 1] or 0.0)
    pairs = [(_le(b), float(c)) for b, c in zip(buckets, counts, strict=True)] + [("+Inf", float(total))]
    return pairs, value_sum


def _le(bound: float) -> str:
    return repr(float(bound))


class DatabaseCollector:
    """A Prometheus collector that reads the job database at each scrape."""

    def __init__(self, database_url: str, *, worker_alive_s: float = WORKER_ALIVE_S) -> None:
        if not database_url:
            raise ValueError("database_url must be a non-empty SQLAlchemy URL")
        self._database_url = database_url
        self._worker_alive_s = worker_alive_s

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked: families are built at scrape time

    def collect(self) -> Iterator[Metric]:
        factory = get_sessionmaker(self._database_url)
        up = GaugeMetricFamily("ptx_database_up", "1 when the job database answered this scrape.")
        try:
            with factory() as session:
                families = list(self._families(session))
        except Exception:  # the scrape must still say the database is down
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self, session) -> Iterator[Metric]:
        counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        jobs = GaugeMetricFamily("ptx_jobs", "Jobs in the database by status.", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], float(counts.get(status.value, 0)))
        yield jobs

        queue = GaugeMetricFamily("ptx_queue_depth", "Jobs waiting for a worker (RECEIVED + QUEUED).")
        queue.add_metric([], float(counts.get(JobStatus.RECEIVED, 0) + counts.get(JobStatus.QUEUED, 0)))
        yield queue

        alive_since = utcnow() - dt.timedelta(seconds=self._worker_alive_s)
        workers = GaugeMetricFamily(
            "ptx_workers_alive", f"Workers with a heartbeat in the last {self._worker_alive_s:g} s that loaded "
            "their model.", labels=["device"]
        )
        serving = 0
        for device, n in session.execute(
            select(WorkerRecord.device, func.count())
            .where(WorkerRecord.last_seen >= alive_since, WorkerRecord.serving_error.is_(None))
            .group_by(WorkerRecord.device)
        ).all():
            workers.add_metric([device or "unknown"], float(n))
            serving += int(n)
        yield workers
        able = GaugeMetricFamily("ptx_workers_serving", "Workers alive and able to serve (0: jobs wait QUEUED).")
        able.add_metric([], float(serving))
        yield able
        unable = GaugeMetricFamily(
            "ptx_workers_unable_to_serve",
            f"Workers that reported in the last {UNABLE_WINDOW_S:g} s that they cannot serve, by reason "
            "(device_unavailable, checkpoint_invalid, checkpoint_unreadable, no_checkpoint, model_load_failed).",
            labels=["reason"],
        )
        for code, n in session.execute(
            select(WorkerRecord.serving_error_code, func.count())
            .where(WorkerRecord.serving_error.is_not(None),
                   WorkerRecord.last_seen >= utcnow() - dt.timedelta(seconds=UNABLE_WINDOW_S))
            .group_by(WorkerRecord.serving_error_code)
        ).all():
            unable.add_metric([code or "unknown"], float(n))
        yield unable

        columns: list[ColumnElement] = []
        for stage in JOB_STAGES:
            columns += _histogram_columns(_stage_value(stage), STAGE_BUCKETS_S, stage)
        inference = Job.inference_ms / 1000.0
        columns += _histogram_columns(inference, INFERENCE_BUCKETS_S, "inference")
        row = session.execute(select(*columns)).one()
        width = len(STAGE_BUCKETS_S) + 2
        stages = HistogramMetricFamily(
            "ptx_job_stage_seconds",
            "Per-job stage latency from the job rows: queue (received->started), process "
            "(started->finished), delivery (finished->delivered), total (received->delivered).",
            labels=["stage"],
        )
        for index, stage in enumerate(JOB_STAGES):
            pairs, value_sum = _bucket_pairs(row, index * width, STAGE_BUCKETS_S)
            stages.add_metric([stage], pairs, value_sum)
        yield stages
        infer = HistogramMetricFamily("ptx_inference_seconds", "Model inference time per job (with TTA).")
        pairs, value_sum = _bucket_pairs(row, len(JOB_STAGES) * width, INFERENCE_BUCKETS_S)
        infer.add_metric([], pairs, value_sum)
        yield infer

        deliveries = GaugeMetricFamily("ptx_deliveries", "Deliveries by destination and status.", labels=["destination", "status"])
        for destination, status, n in session.execute(
            select(Delivery.destination, Delivery.status, func.count()).group_by(Delivery.destination, Delivery.status)
        ).all():
            deliveries.add_metric([destination, status], float(n))
        yield deliveries

        stored: dict[str, list[tuple[str, float]]] = {}
        for name, labels, value in session.execute(select(MetricCounter.name, MetricCounter.labels, MetricCounter.value)):
            stored.setdefault(name, []).append((labels, float(value)))
        for name, (help_text, label_names) in COUNTERS.items():
            family = CounterMetricFamily(name.removesuffix("_total"), help_text, labels=list(label_names))
            for labels, value in sorted(stored.get(name, [])):
                values = _label_values(labels)
                family.add_metric([values.get(label, "") for label in label_names], value)
            if not label_names and not stored.get(name):
                family.add_metric([], 0.0)
            yield family


class SpoolSpaceCollector:
    """Free space on the spool's filesystem and whether intake is paused for it."""

    def __init__(self, config: NodeConfig) -> None:
        self._config = config

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from node.disk import spool_space

        try:
            space = spool_space(self._config)
        except OSError:
            return
        yield GaugeMetricFamily("ptx_spool_free_bytes", "Free bytes on the spool's filesystem", value=space.free_bytes)
        yield GaugeMetricFamily("ptx_spool_size_bytes", "Size of the spool's filesystem", value=space.total_bytes)
        yield GaugeMetricFamily("ptx_spool_min_free_bytes", "Free space below which intake stops (watermark)",
                                value=space.min_free_bytes)
        yield GaugeMetricFamily("ptx_intake_paused", "1 while intake refuses instances for lack of disk space",
                                value=1.0 if space.low else 0.0)


def node_registry(database_url: str, *, config: NodeConfig | None = None) -> CollectorRegistry:
    """The registry the node's /metrics serves: database figures plus this process's own
    (and the spool's free space when ``config`` is given)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(database_url))
    registry.register(_NodeProcessCollector())
    if config is not None:
        registry.register(SpoolSpaceCollector(config))
    return registry


class _NodeProcessCollector:
    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from _NODE_REGISTRY.collect()


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)

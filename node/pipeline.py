"""One job, start to finish: claim the row, run the model, write SEG/SC, deliver, record.

Idempotent by construction:
- the row is claimed with a conditional UPDATE and a lease, so two deliveries of
  the same message never run the job twice at once, and a DONE job is left alone;
- output UIDs are fixed in the row before the files are written, so a re-run after
  a crash rewrites and re-sends the very same instances (the PACS keeps one copy);
- each destination has its own delivery row, so a retry only sends where needed.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import or_, select, update

from node.config import NodeConfig
from node.db import Delivery, DeliveryStatus, Job, JobStatus, WorkerRecord, get_sessionmaker, utcnow
from node.intake import write_durably

__all__ = ["OutputFiles", "claim_job", "process_job", "worker_name"]

log = logging.getLogger(__name__)

_PROCESSING = (JobStatus.RECEIVED, JobStatus.QUEUED, JobStatus.RUNNING)
_CLAIMABLE = (*_PROCESSING, JobStatus.SENDING)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class OutputFiles:
    seg: Path | None
    sc: Path | None
    png: Path | None

    def dicom_paths(self) -> list[Path]:
        return [p for p in (self.seg, self.sc) if p is not None and p.exists()]


def output_files(job: Job) -> OutputFiles:
    base = Path(job.output_dir) if job.output_dir else None
    if base is None:
        return OutputFiles(None, None, None)
    return OutputFiles(
        base / "seg.dcm" if job.seg_sop_instance_uid else None,
        base / "sc.dcm" if job.sc_sop_instance_uid else None,
        base / "overlay.png" if job.sc_sop_instance_uid else None,
    )


# --- the model, loaded once per process -------------------------------------------------

_segmenter: Any = None
_segmenter_lock = threading.Lock()


def resolve_device(config: NodeConfig) -> str:
    if config.model.device != "auto":
        return config.model.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def get_segmenter(config: NodeConfig) -> Any:
    """The process's one Segmenter: from the checkpoint, or untrained when allowed."""
    global _segmenter
    with _segmenter_lock:
        if _segmenter is None:
            from model import Segmenter

            device = resolve_device(config)
            if config.model.checkpoint is not None:
                _segmenter = Segmenter.from_checkpoint(config.model.checkpoint, device=device, tta=config.model.tta)
            elif config.model.allow_untrained:
                _segmenter = Segmenter.untrained(
                    device=device, input_size=config.model.untrained_input_size, tta=config.model.tta
                )
            else:
                raise RuntimeError(
                    "no model checkpoint configured ([model] checkpoint); "
                    "run with --allow-untrained to serve an untrained network for testing"
                )
            log.info(
                "model %s %s on %s (checkpoint sha256 %s)",
                _segmenter.name, _segmenter.version, device, _segmenter.checkpoint_sha256 or "none: UNTRAINED",
            )
        return _segmenter


# --- claiming ------------------------------------------------------------------------------


def claim_job(config: NodeConfig, job_id: int) -> Job | None:
    """Take the job's lease if nobody holds it and it has work left; None otherwise."""
    now = utcnow()
    factory = get_sessionmaker(config.database_url)
    with factory() as session:
        result = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.status.in_([s.value for s in _CLAIMABLE]),
                or_(Job.lease_until.is_(None), Job.lease_until < now),
                or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now + dt.timedelta(seconds=1)),
            )
            .values(
                lease_until=now + dt.timedelta(seconds=config.worker.lease_s),
                worker=worker_name(),
                next_attempt_at=None,
            )
        )
        session.commit()
        if result.rowcount != 1:
            return None
        return session.get(Job, job_id)


class _LeaseKeeper:
    """Renews the job's lease while this process works on it."""

    def __init__(self, config: NodeConfig, job_id: int) -> None:
        self._config = config
        self._job_id = job_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        factory = get_sessionmaker(self._config.database_url)
        while not self._stop.wait(self._config.worker.heartbeat_s):
            try:
                with factory() as session:
                    session.execute(
                        update(Job)
                        .where(Job.id == self._job_id, Job.worker == worker_name())
                        .values(lease_until=utcnow() + dt.timedelta(seconds=self._config.worker.lease_s))
                    )
                    session.commit()
            except Exception:
                log.exception("job %s: could not renew lease", self._job_id)


# --- the job ---------------------------------------------------------------------------------


def process_job(config: NodeConfig, *, job_id: int) -> str:
    """Do whatever is left of the job. Returns what happened (for logs and tests)."""
    factory = get_sessionmaker(config.database_url)
    job = claim_job(config, job_id)
    if job is None:
        log.info("job %s: nothing to do (finished, or held by another worker)", job_id)
        return "noop"
    with _LeaseKeeper(config, job_id):
        try:
            if job.status in _PROCESSING:
                if job.status == JobStatus.RUNNING and job.attempts >= config.worker.max_attempts:
                    _finish(config, job_id, JobStatus.FAILED,
                            f"gave up after {job.attempts} attempts (the worker died while processing)")
                    return "failed"
                _set(config, job_id, status=JobStatus.RUNNING, attempts=job.attempts + 1,
                     started_at=job.started_at or utcnow())
                written = _run_model_and_write(config, job_id)
                if written.outcome != "written":
                    return written.outcome
                return _deliver(config, job_id, already_sent=written.early_sent)
            return _deliver(config, job_id)
        except Exception as exc:
            log.exception("job %s: failed", job_id)
            with factory() as session:
                current = session.get(Job, job_id)
                attempts = current.attempts if current else 0
            if current is not None and current.status == JobStatus.RUNNING and attempts < config.worker.max_attempts:
                delay = config.delivery.backoff_s(attempts)
                _set(config, job_id, lease_until=None, error=f"{type(exc).__name__}: {exc}",
                     next_attempt_at=utcnow() + dt.timedelta(seconds=delay))
                _requeue_later(config, job_id, delay)
                return "retry"
            _finish(config, job_id, JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
            return "failed"


def _set(config: NodeConfig, job_id: int, **values: Any) -> None:
    factory = get_sessionmaker(config.database_url)
    with factory() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def _finish(config: NodeConfig, job_id: int, status: JobStatus, error: str | None) -> None:
    """End the job; finished_at keeps the end of processing when there was one."""
    factory = get_sessionmaker(config.database_url)
    with factory() as session:
        session.execute(update(Job).where(Job.id == job_id)
                        .values(status=status, error=error, lease_until=None))
        session.execute(update(Job).where(Job.id == job_id, Job.finished_at.is_(None))
                        .values(finished_at=utcnow()))
        session.commit()
    log.info("job %s: %s%s", job_id, status, f" ({error})" if error else "")


def _requeue_later(config: NodeConfig, job_id: int, delay_s: float) -> None:
    from node.tasks import enqueue_job

    enqueue_job(config, job_id, countdown=delay_s)


@dataclass
class _Written:
    outcome: str
    # Destinations that already hold some outputs (sent before the rest was ready).
    early_sent: dict[str, set[Path]] = field(default_factory=dict)


def _send_early(config: NodeConfig, path: Path) -> dict[str, set[Path]]:
    """Send one finished output now, best effort; delivery proper sends what is missing."""
    from node.delivery import DeliveryError, send_to_destination

    sent: dict[str, set[Path]] = {}
    for dest in config.destinations:
        try:
            send_to_destination(config, dest, [path])
        except DeliveryError as exc:
            log.info("early send of %s to %s failed (%s); it goes with the rest", path.name, dest.name, exc)
            continue
        sent[dest.name] = {path}
    return sent


def _run_model_and_write(config: NodeConfig, job_id: int) -> _Written:
    from model import UnsupportedImageError, source_image_from_dataset
    from node.outputs import build_overlay, build_seg, outputs_for, write_png

    factory = get_sessionmaker(config.database_url)
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        spool_path = job.spool_path
    if not spool_path or not Path(spool_path).exists():
        _finish(config, job_id, JobStatus.FAILED, f"spooled file missing: {spool_path}")
        return _Written("failed")
    ds = pydicom.dcmread(spool_path)
    try:
        source = source_image_from_dataset(ds)
    except (UnsupportedImageError, NotImplementedError, RuntimeError, ValueError) as exc:
        _finish(config, job_id, JobStatus.SKIPPED, f"cannot decode pixels: {exc}")
        return _Written("skipped")

    segmenter = get_segmenter(config)
    started = time.perf_counter()
    prediction = segmenter.predict(source, tta=config.model.tta)
    inference_ms = (time.perf_counter() - started) * 1000.0

    options = config.outputs
    plan = outputs_for(prediction, options)
    write_seg, write_sc = plan.seg, plan.sc

    # Fix the UIDs first: a re-run after a crash writes and sends the same instances.
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.output_dir = job.output_dir or str(config.spool_dir / "outputs" / f"{job_id:08d}")
        if write_seg and not job.seg_sop_instance_uid:
            job.seg_series_instance_uid = generate_uid()
            job.seg_sop_instance_uid = generate_uid()
        if write_sc and not job.sc_sop_instance_uid:
            job.sc_series_instance_uid = generate_uid()
            job.sc_sop_instance_uid = generate_uid()
        job.model_name = segmenter.name
        job.model_version = segmenter.version
        job.checkpoint_sha256 = segmenter.checkpoint_sha256
        job.untrained = bool(segmenter.untrained)
        session.commit()
        files = output_files(job)
        uids = (job.seg_series_instance_uid, job.seg_sop_instance_uid,
                job.sc_series_instance_uid, job.sc_sop_instance_uid)

    out_dir = Path(job.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from node.outputs import AlgorithmInfo

    algorithm = AlgorithmInfo.from_segmenter(segmenter)
    written = _Written("written")
    if write_seg and files.seg is not None:
        seg = build_seg(ds, prediction.mask, algorithm=algorithm, series_instance_uid=uids[0],
                        sop_instance_uid=uids[1], options=options)
        write_durably(seg, files.seg, file_meta=seg.file_meta)
        if write_sc:
            # The SEG reaches the PACS while the overlay is still being drawn.
            written.early_sent = _send_early(config, files.seg)
    if write_sc and files.sc is not None:
        sc, rgb = build_overlay(ds, source.pixels, prediction, algorithm=algorithm,
                                series_instance_uid=uids[2], sop_instance_uid=uids[3], options=options)
        write_durably(sc, files.sc, file_meta=sc.file_meta)
        if files.png is not None:
            # After the SEG went out, before the job can be DONE (the demo reads it then).
            write_png(rgb, files.png)

    _set(
        config, job_id,
        status=JobStatus.SENDING,
        positive=bool(prediction.positive),
        max_probability=float(prediction.score),
        area_px=int(prediction.area_px),
        area_mm2=None if prediction.area_mm2 is None else float(prediction.area_mm2),
        n_components=int(prediction.n_components),
        inference_ms=inference_ms,
        error=None,
        finished_at=utcnow(),  # processing finished; delivered_at marks the delivery
    )
    log.info("job %s: %s (max p %.3f, %d px) in %.0f ms", job_id,
             "positive" if prediction.positive else "negative", prediction.score, prediction.area_px, inference_ms)
    record_worker(config, segmenter, jobs_done=1)
    return written


def _deliver(config: NodeConfig, job_id: int, *, already_sent: dict[str, set[Path]] | None = None) -> str:
    from node.delivery import DeliveryError, send_to_destination

    factory = get_sessionmaker(config.database_url)
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        paths = output_files(job).dicom_paths()
        existing = {d.destination: d for d in job.deliveries}
        for dest in config.destinations:
            if dest.name not in existing:
                delivery = Delivery(job_id=job_id, destination=dest.name)
                session.add(delivery)
                existing[dest.name] = delivery
        session.commit()
        pending = [d.destination for d in existing.values() if d.status == DeliveryStatus.PENDING]

    failures: list[str] = []
    retry_in: float | None = None
    for name in pending:
        try:
            dest = config.destination(name)
        except KeyError:
            failures.append(f"{name}: destination no longer configured")
            continue
        try:
            done_early = (already_sent or {}).get(name, set())
            missing = [p for p in paths if p not in done_early]
            sent = len(paths) - len(missing)
            sent += send_to_destination(config, dest, missing) if missing else 0
        except DeliveryError as exc:
            with factory() as session:
                delivery = session.scalar(select(Delivery).where(Delivery.job_id == job_id, Delivery.destination == name))
                delivery.attempts += 1
                delivery.last_error = str(exc)
                attempts = delivery.attempts
                if attempts >= config.delivery.max_attempts:
                    delivery.status = DeliveryStatus.FAILED
                    failures.append(f"delivery to {name} failed after {attempts} attempts: {exc}")
                else:
                    delay = config.delivery.backoff_s(attempts)
                    retry_in = delay if retry_in is None else min(retry_in, delay)
                session.commit()
            _metric_retry(name)
            log.warning("job %s: delivery to %s failed (attempt %d): %s", job_id, name, attempts, exc)
            continue
        with factory() as session:
            delivery = session.scalar(select(Delivery).where(Delivery.job_id == job_id, Delivery.destination == name))
            delivery.attempts += 1
            delivery.status = DeliveryStatus.DELIVERED
            delivery.delivered_at = utcnow()
            delivery.instances_sent = sent
            delivery.last_error = None
            session.commit()
        log.info("job %s: delivered %d instance(s) to %s", job_id, sent, name)

    if retry_in is not None:
        _set(config, job_id, status=JobStatus.SENDING, lease_until=None,
             next_attempt_at=utcnow() + dt.timedelta(seconds=retry_in),
             error="; ".join(failures) or "delivery pending retry")
        _requeue_later(config, job_id, retry_in)
        return "retry"
    if failures:
        _finish(config, job_id, JobStatus.FAILED, "; ".join(failures))
        return "failed"
    _set(config, job_id, status=JobStatus.DONE, error=None, lease_until=None,
         delivered_at=utcnow() if config.destinations else None)
    log.info("job %s: DONE", job_id)
    return "done"


def _metric_retry(destination: str) -> None:
    try:
        from node.metrics import inc_delivery_retry
    except ImportError:
        return
    inc_delivery_retry(destination)


def record_worker(config: NodeConfig, segmenter: Any, *, jobs_done: int = 0) -> None:
    """This process's row in `workers` (status page: alive, device, model); never raises."""
    factory = get_sessionmaker(config.database_url)
    try:
        with factory() as session:
            record = session.get(WorkerRecord, worker_name())
            if record is None:
                record = WorkerRecord(name=worker_name(), started_at=utcnow(), jobs_done=0)
                session.add(record)
            record.device = resolve_device(config)
            record.model_name = segmenter.name
            record.model_version = segmenter.version
            record.checkpoint_sha256 = segmenter.checkpoint_sha256
            record.last_seen = utcnow()
            record.jobs_done = (record.jobs_done or 0) + jobs_done
            session.commit()
    except Exception:
        log.exception("could not record worker heartbeat")

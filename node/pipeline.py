"""One job, start to finish: claim the row, run the model, write SEG/SR/GSPS/SC, deliver, record.

Idempotent by construction:
- the row is claimed with a conditional UPDATE and a lease, so two deliveries of
  the same message never run the job twice at once, and a DONE job is left alone;
- output UIDs are fixed in the row before the files are written, so a re-run after
  a crash rewrites and re-sends the very same instances (the PACS keeps one copy);
- each output object has its own delivery row per destination, so a retry only sends what is missing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from celery.exceptions import SoftTimeLimitExceeded
from pydicom.uid import generate_uid
from sqlalchemy import update

from node.config import NodeConfig
from node.db import Job, JobStatus, WorkerRecord, db_utcnow, get_sessionmaker, utcnow
from node.deliveries import OutputFiles, deliver_pending, delivery_state, output_files
from node.durable import write_durably
from node.lease import Lease, LeaseKeeper, LeaseLost, claim, hold
from node.reasons import JobReason, ReasonCode, RefusedInstance, first_line

# OutputFiles and output_files are re-exported (their home is node.deliveries).
__all__ = ["OutputFiles", "output_files", "process_job", "record_worker", "worker_name", "worker_row"]

log = logging.getLogger(__name__)

_PROCESSING = (JobStatus.RECEIVED, JobStatus.QUEUED, JobStatus.RUNNING)
_CLAIMABLE = (*_PROCESSING, JobStatus.SENDING)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


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
                from node.preparation import ModelNotConfigured

                raise ModelNotConfigured(
                    "no model checkpoint configured ([model] checkpoint); "
                    "run with --allow-untrained to serve an untrained network for testing"
                )
            log.info(
                "model %s %s on %s (checkpoint sha256 %s)",
                _segmenter.name, _segmenter.version, device, _segmenter.checkpoint_sha256 or "none: UNTRAINED",
            )
        return _segmenter


# --- claiming ------------------------------------------------------------------------------


# --- the job ---------------------------------------------------------------------------------


def process_job(config: NodeConfig, *, job_id: int) -> str:
    """Do whatever is left of the job. Returns what happened (for logs and tests)."""
    lease = claim(config, job_id, [s.value for s in _CLAIMABLE], worker_name())
    if lease is None:
        log.info("job %s: nothing to do (finished, or held by another worker)", job_id)
        return "noop"
    with get_sessionmaker(config.database_url)() as session:
        job = session.get(Job, job_id)
    assert job is not None
    with LeaseKeeper(config, lease):
        try:
            return _run(config, lease, job)
        except LeaseLost:
            log.warning("job %s: lease taken over by another worker; stopped without writing", job_id)
            return "lease-lost"


def _run(config: NodeConfig, lease: Lease, job: Job) -> str:
    job_id = lease.job_id
    try:
        if job.status in _PROCESSING:
            if job.status == JobStatus.RUNNING and job.attempts >= config.worker.max_attempts:
                _finish(config, lease, JobStatus.FAILED, JobReason(
                    ReasonCode.WORKER_LOST,
                    f"gave up after {job.attempts} attempts (the worker died while processing)"))
                return "failed"
            _set(config, lease, status=JobStatus.RUNNING, attempts=job.attempts + 1,
                 started_at=job.started_at or utcnow())
            outcome = _run_model_and_write(config, lease)
            if outcome != "written":
                return outcome
        return _deliver(config, lease)
    except LeaseLost:
        raise
    except Exception as exc:
        from node.preparation import reason_for_failure

        log.exception("job %s: failed", job_id)
        with get_sessionmaker(config.database_url)() as session:
            current = session.get(Job, job_id)
        timed_out = isinstance(exc, SoftTimeLimitExceeded)
        reason = (JobReason(ReasonCode.INTERNAL,
                            f"took longer than the task time limit ({config.worker.task_time_limit_s:.0f} s)")
                  if timed_out else reason_for_failure(exc, job_id))
        retry = current is not None and (
            (current.status == JobStatus.RUNNING and current.attempts < config.worker.max_attempts)
            or (current.status == JobStatus.SENDING and timed_out))
        if retry:
            # The sweeper publishes it again when next_attempt_at falls due.
            delay = config.delivery.backoff_s(current.attempts or 1)
            _set(config, lease, lease_until=None, error=reason.sentence, reason_code=str(reason.code),
                 next_attempt_at=db_utcnow(delay))  # the sweeper compares it with the database's clock
            return "retry"
        _finish(config, lease, JobStatus.FAILED, reason)
        return "failed"


def _set(config: NodeConfig, lease: Lease, **values: Any) -> None:
    """Update our job row; ``LeaseLost`` if it is no longer ours."""
    factory = get_sessionmaker(config.database_url)
    with factory() as session:
        result = session.execute(update(Job).where(lease.holds()).values(**values))
        session.commit()
    if result.rowcount != 1:
        raise LeaseLost(f"job {lease.job_id}: lease taken over")


def _finish(config: NodeConfig, lease: Lease, status: JobStatus, reason: JobReason | None) -> None:
    """End the job with its reason (code and sentence); finished_at keeps the end of processing."""
    factory = get_sessionmaker(config.database_url)
    error = None if reason is None else reason.sentence
    with factory() as session:
        hold(session, lease)
        session.execute(update(Job).where(lease.holds())
                        .values(status=status, error=error, lease_until=None,
                                reason_code=None if reason is None else str(reason.code)))
        session.execute(update(Job).where(lease.holds(), Job.finished_at.is_(None))
                        .values(finished_at=utcnow()))
        if status == JobStatus.FAILED:
            from node.metrics import count_event

            count_event(session.connection(), "ptx_jobs_failed_total")
        session.commit()
    log.info("job %s: %s%s", lease.job_id, status, f" ({reason})" if reason else "")


def _run_model_and_write(config: NodeConfig, lease: Lease) -> str:
    """"written", or the job's outcome when it ended here ("failed", "skipped")."""
    from node.outputs import outputs_for, write_png
    from node.preparation import build_outputs, prepare_instance

    job_id = lease.job_id
    factory = get_sessionmaker(config.database_url)
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        spool_path = job.spool_path
    if not spool_path or not Path(spool_path).exists():
        _finish(config, lease, JobStatus.FAILED, JobReason(
            ReasonCode.SPOOL_MISSING, "the spooled file is missing; send the instance again"))
        return "failed"
    try:
        prepared = prepare_instance(pydicom.dcmread(spool_path), config)
    except pydicom.errors.InvalidDicomError:
        log.info("job %s: spooled file is not readable DICOM", job_id, exc_info=True)
        _finish(config, lease, JobStatus.SKIPPED,
                JobReason(ReasonCode.UNDECODABLE, "the spooled file is not readable DICOM"))
        return "skipped"
    except RefusedInstance as refused:
        _finish(config, lease, JobStatus.SKIPPED, refused.reason)
        return "skipped"
    source = prepared.source

    segmenter = get_segmenter(config)
    started = time.perf_counter()
    prediction = segmenter.predict(source, tta=config.model.tta)
    inference_ms = (time.perf_counter() - started) * 1000.0

    options = config.outputs
    plan = outputs_for(prediction, options)

    # Fix the UIDs first: a re-run after a crash writes and sends the same instances.
    with factory() as session:
        hold(session, lease)
        job = session.get(Job, job_id)
        assert job is not None
        job.output_dir = job.output_dir or str(config.spool_dir / "outputs" / f"{job_id:08d}")
        for kind in plan.kinds:
            if not getattr(job, f"{kind}_sop_instance_uid"):
                setattr(job, f"{kind}_series_instance_uid", generate_uid())
                setattr(job, f"{kind}_sop_instance_uid", generate_uid())
        job.model_name = segmenter.name
        job.model_version = segmenter.version
        job.checkpoint_sha256 = segmenter.checkpoint_sha256
        job.untrained = bool(segmenter.untrained)
        session.commit()
        files = output_files(job)
        uids = {kind: (getattr(job, f"{kind}_series_instance_uid"), getattr(job, f"{kind}_sop_instance_uid"))
                for kind in plan.kinds}

    out_dir = Path(job.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from node.outputs import AlgorithmInfo, OutputKind, regions_for

    algorithm = AlgorithmInfo.from_segmenter(segmenter)
    regions = None  # the SR's and the GSPS's, computed once for both
    for kind in plan.kinds:  # delivery order: SEG, SR, GSPS, SC
        path = files.path_of(kind)
        assert path is not None
        if regions is None and kind in (OutputKind.SR, OutputKind.GSPS):
            regions = regions_for(prepared.header.dataset, prediction, options)
        built = build_outputs(prepared, prediction, [kind], algorithm=algorithm, options=options, uids=uids,
                              regions=regions)
        dataset = built.objects[kind]
        write_durably(dataset, path, file_meta=dataset.file_meta)
        if kind is OutputKind.SEG and len(plan.kinds) > 1:
            # The SEG reaches the PACS while the other objects (the overlay is slow) are made.
            deliver_pending(config, lease, kinds=frozenset({"SEG"}))
        if kind is OutputKind.SC and files.png is not None and built.rgb is not None:
            # After the SEG went out, before the job can be DONE (the demo reads it then).
            write_png(built.rgb, files.png)

    _set(
        config, lease,
        status=JobStatus.SENDING,
        positive=bool(prediction.positive),
        max_probability=float(prediction.score),
        area_px=int(prediction.area_px),
        area_mm2=None if prediction.area_mm2 is None else float(prediction.area_mm2),
        n_components=int(prediction.n_components),
        inference_ms=inference_ms,
        error=None,
        reason_code=None,
        header_repairs="; ".join(prepared.header.repairs) or None,
        finished_at=utcnow(),  # processing finished; delivered_at marks the delivery
    )
    log.info("job %s: %s (max p %.3f, %d px) in %.0f ms", job_id,
             "positive" if prediction.positive else "negative", prediction.score, prediction.area_px, inference_ms)
    record_worker(config, segmenter, jobs_done=1)
    return "written"


def _deliver(config: NodeConfig, lease: Lease) -> str:
    """Send what each destination still lacks, then set the job's status from its delivery rows."""
    job_id = lease.job_id
    deliver_pending(config, lease)
    state = delivery_state(config, job_id)
    if state.next_attempt_at is not None:
        # Released; the sweeper publishes the job again when its next attempt falls due.
        _set(config, lease, status=JobStatus.SENDING, lease_until=None, next_attempt_at=state.next_attempt_at,
             error="; ".join(state.failed + state.waiting))
        return "retry"
    if state.failed:
        _finish(config, lease, JobStatus.FAILED,
                JobReason(ReasonCode.DELIVERY_FAILED, "; ".join(state.failed + state.refused)))
        return "failed"
    # A permanent refusal (a PACS that takes no SEG) does not make the job fail; it is noted.
    _set(config, lease, status=JobStatus.DONE, error="; ".join(state.refused) or None, reason_code=None, lease_until=None,
         next_attempt_at=None, delivered_at=utcnow() if config.destinations else None)
    log.info("job %s: DONE", job_id)
    return "done"


def worker_row(session: Any) -> WorkerRecord:
    """This process's row in `workers`, added to the session if it has none yet."""
    record = session.get(WorkerRecord, worker_name())
    if record is None:
        record = WorkerRecord(name=worker_name(), started_at=utcnow(), jobs_done=0)
        session.add(record)
    return record


def record_worker(config: NodeConfig, segmenter: Any, *, jobs_done: int = 0) -> None:
    """This process's row in `workers` (status page: alive, device, model); never raises."""
    factory = get_sessionmaker(config.database_url)
    try:
        with factory() as session:
            record = worker_row(session)
            record.device = resolve_device(config)
            record.model_name = segmenter.name
            record.model_version = segmenter.version
            record.checkpoint_sha256 = segmenter.checkpoint_sha256
            record.last_seen = utcnow()
            record.jobs_done = (record.jobs_done or 0) + jobs_done
            record.settings_digest = config.shared_settings_digest()
            record.serving_error = record.serving_error_code = None
            session.commit()
    except Exception as exc:  # one line: the heartbeat repeats
        log.warning("could not record worker heartbeat: %s", first_line(exc))

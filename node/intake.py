"""Intake shared by the C-STORE SCP and STOW-RS: select, spool durably, record.

An instance is accepted (the caller gets Success) only after its file is fsynced
in the spool and its job row is committed. Instances the node does not process
(a lateral view, a CT, an RGB photo) are accepted too and recorded as SKIPPED
with the reason, so a PACS routing rule that sends too much causes no retries.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from sqlalchemy import insert, select, update

from node.config import NodeConfig
from node.db import Delivery, DeliveryStatus, Job, JobStatus, get_engine, utcnow

__all__ = [
    "ACCEPTED_SOP_CLASSES",
    "IntakeOutcome",
    "IntakeResult",
    "accept_instance",
    "selection_reason",
    "spool_filename",
    "write_durably",
]

log = logging.getLogger(__name__)

# Storage SOP classes the node accepts (others are refused at association time).
ACCEPTED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
}

_CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "PORT CHEST", "CHEST_PA", "CHEST PA"}
_FRONTAL_VIEWS = {"PA", "AP", "APS", "PAS"}
_OWN_MANUFACTURER = "ptx-node"


class IntakeOutcome(enum.StrEnum):
    QUEUED = "queued"  # a new job row RECEIVED, to be enqueued
    SKIPPED = "skipped"  # a job row SKIPPED with the reason
    DUPLICATE = "duplicate"  # same instance, same pixels: the existing job stands


@dataclass(frozen=True)
class IntakeResult:
    outcome: IntakeOutcome
    job_id: int
    reason: str | None = None


def selection_reason(ds: Dataset, *, min_image_size: int = 256) -> str | None:
    """Why the node will not process this instance, or None for a frontal chest radiograph."""
    modality = str(ds.get("Modality", "") or "").upper()
    if str(ds.get("Manufacturer", "") or "") == _OWN_MANUFACTURER:
        return "output of ptx-node itself"
    if modality not in {"CR", "DX"}:
        return f"modality {modality or 'missing'} is not CR or DX"
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body_part and body_part not in _CHEST_BODY_PARTS:
        return f"body part {body_part} is not CHEST"
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view and view not in _FRONTAL_VIEWS:
        return f"view position {view} is not frontal (PA/AP)"
    if "PixelData" not in ds:
        return "no pixel data"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        return f"{frames} frames; only single-frame radiographs are processed"
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    if samples != 1 or photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        return f"not grayscale ({photometric or 'no photometric interpretation'}, {samples} samples per pixel)"
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if min(rows, cols) < min_image_size:
        return f"image {cols}x{rows} is smaller than {min_image_size} px: not a radiograph to segment"
    return None


_UID_CHARS = re.compile(r"[^0-9.]")


def spool_filename(sop_instance_uid: str, pixel_sha256: str) -> str:
    """A file name from the sanitized UID plus a hash: never raw header text."""
    clean = _UID_CHARS.sub("", sop_instance_uid)[:64]
    if not clean or clean != sop_instance_uid:
        clean = hashlib.sha256(sop_instance_uid.encode("utf-8", "replace")).hexdigest()[:32]
    return f"{clean}.{pixel_sha256[:12]}.dcm"


def _pixel_sha256(ds: Dataset) -> str:
    digest = hashlib.sha256()
    pixel_data = ds.get((0x7FE0, 0x0010))
    if pixel_data is not None and pixel_data.value is not None:
        digest.update(pixel_data.value)
    return digest.hexdigest()


_salts: dict[Path, bytes] = {}


def installation_salt(spool_dir: Path) -> bytes:
    """A random secret per installation (``spool_dir/patient-id.salt``, made on first use):
    short numeric patient IDs hashed with a public constant could be reversed by trying them all."""
    path = spool_dir / "patient-id.salt"
    salt = _salts.get(path)
    if salt is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
                fh.flush()
                os.fsync(fh.fileno())
        salt = bytes.fromhex(path.read_text().strip())
        _salts[path] = salt
    return salt


def patient_id_hash(ds: Dataset, salt: bytes) -> str | None:
    """Lets admins see that two jobs are the same patient without storing who it is."""
    patient_id = str(ds.get("PatientID", "") or "")
    if not patient_id:
        return None
    return hashlib.sha256(salt + patient_id.encode("utf-8", "replace")).hexdigest()[:16]


def write_durably(ds: Dataset, path: Path, *, file_meta: FileMetaDataset | None = None,
                  encoded: bytes | None = None) -> None:
    """Write a DICOM file so it survives a crash: temp name, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as fh:
            if encoded is not None:
                fh.write(encoded)  # the sender's bytes as received: no re-encoding
            else:
                ds = Dataset(ds)
                if file_meta is not None:
                    ds.file_meta = file_meta
                ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _str(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


def accept_instance(
    ds: Dataset,
    *,
    file_meta: FileMetaDataset | None,
    config: NodeConfig,
    source: str = "dimse",
    calling_ae: str | None = None,
    calling_host: str | None = None,
    encoded: bytes | None = None,
) -> IntakeResult:
    """Select, spool (fsync) and record one instance; returns once the row is committed.

    ``encoded``: the instance as a DICOM file (preamble, meta, data set) exactly as it
    arrived; written as is when given, else ``ds`` is encoded. Raises ``ValueError`` when
    the dataset lacks the identifying UIDs.
    """
    sop_instance_uid = _str(ds, "SOPInstanceUID")
    if not sop_instance_uid:
        raise ValueError("dataset has no SOP Instance UID")
    transfer_syntax = None
    if file_meta is not None and "TransferSyntaxUID" in file_meta:
        transfer_syntax = str(file_meta.TransferSyntaxUID)
    pixel_sha256 = _pixel_sha256(ds)
    reason = selection_reason(ds, min_image_size=config.scp.min_image_size)

    # Core statements, not the ORM: this runs once per C-STORE, inside the sender's wait.
    engine = get_engine(config.database_url)
    with engine.connect() as conn:
        existing = conn.execute(
            select(Job.id, Job.error, Job.status, Job.spool_path)
            .where(Job.sop_instance_uid == sop_instance_uid, Job.pixel_sha256 == pixel_sha256)
            .order_by(Job.id.desc())
            .limit(1)
        ).first()
    if existing is not None:
        if existing.status == JobStatus.FAILED and existing.spool_path and Path(existing.spool_path).exists():
            # An admin re-sending a failed study means "try again": reopen the same job.
            _reopen_failed(engine, existing.id)
            log.info("job %s: instance %s re-sent after failure; job reopened", existing.id, sop_instance_uid)
            return IntakeResult(IntakeOutcome.QUEUED, existing.id, "reopened after failure")
        log.info("job %s: instance %s received again with the same pixels", existing.id, sop_instance_uid)
        return IntakeResult(IntakeOutcome.DUPLICATE, existing.id, existing.error)

    received_at = utcnow()
    row = {
        "status": JobStatus.SKIPPED if reason else JobStatus.RECEIVED,
        "source": source,
        "calling_ae": calling_ae,
        "calling_host": calling_host,
        "sop_instance_uid": sop_instance_uid,
        "sop_class_uid": _str(ds, "SOPClassUID"),
        "study_instance_uid": _str(ds, "StudyInstanceUID"),
        "series_instance_uid": _str(ds, "SeriesInstanceUID"),
        "transfer_syntax_uid": transfer_syntax,
        "patient_id_hash": patient_id_hash(ds, installation_salt(config.spool_dir)),
        "modality": _str(ds, "Modality", 16),
        "body_part": _str(ds, "BodyPartExamined", 16),
        "view_position": _str(ds, "ViewPosition", 16),
        "rows": int(ds.get("Rows", 0) or 0) or None,
        "columns": int(ds.get("Columns", 0) or 0) or None,
        "pixel_sha256": pixel_sha256,
        "error": reason,
        "received_at": received_at,
        "updated_at": received_at,
        "finished_at": received_at if reason else None,
    }
    if not reason:
        # File first, row second: a row never points at a file that is not on disk.
        spool_path = config.spool_dir / "incoming" / spool_filename(sop_instance_uid, pixel_sha256)
        write_durably(ds, spool_path, file_meta=file_meta, encoded=encoded)
        row["spool_path"] = str(spool_path)
    with engine.begin() as conn:
        job_id = int(conn.execute(insert(Job).values(**row)).inserted_primary_key[0])
    if reason:
        log.info("job %s: SKIPPED instance %s: %s", job_id, sop_instance_uid, reason)
        return IntakeResult(IntakeOutcome.SKIPPED, job_id, reason)
    log.info("job %s: RECEIVED instance %s (study %s)", job_id, sop_instance_uid, row["study_instance_uid"])
    return IntakeResult(IntakeOutcome.QUEUED, job_id)


def _reopen_failed(engine: Any, job_id: int) -> None:
    """FAILED -> SENDING when its outputs are on disk (deliver them again), else RECEIVED
    (run it again); retry counters start over."""
    with engine.begin() as conn:
        job = conn.execute(select(Job.output_dir, Job.seg_sop_instance_uid, Job.sc_sop_instance_uid)
                           .where(Job.id == job_id)).one()
        outputs = [Path(job.output_dir) / name for name, uid in (("seg.dcm", job.seg_sop_instance_uid),
                                                                  ("sc.dcm", job.sc_sop_instance_uid))
                   if job.output_dir and uid]
        has_outputs = bool(outputs) and all(p.exists() for p in outputs)
        conn.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.FAILED)
            .values(status=JobStatus.SENDING if has_outputs else JobStatus.RECEIVED, attempts=0, error=None,
                    lease_until=None, next_attempt_at=None, queued_at=None, delivered_at=None,
                    updated_at=utcnow())
        )
        conn.execute(
            update(Delivery)
            .where(Delivery.job_id == job_id, Delivery.status == DeliveryStatus.FAILED)
            .values(status=DeliveryStatus.PENDING, attempts=0)
        )


def read_spooled(path: str | os.PathLike[str]) -> Dataset:
    """Read a spooled instance back (the worker's entry point to the pixels)."""
    return pydicom.dcmread(path)


def transfer_syntax_of(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    return getattr(meta, "TransferSyntaxUID", None)

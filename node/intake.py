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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from sqlalchemy import select, update

from node.config import DEFAULT_MAX_DECODED_BYTES, NodeConfig
from node.db import Delivery, DeliveryStatus, Job, JobStatus, get_engine, upsert_insert, utcnow
from node.disk import check_spool_space
from node.durable import (
    move_durably,
    write_durably,  # re-exported: the spool's write lives in node.durable
)
from node.metrics import count_event
from node.outputs.sanitize import check_identity
from node.reasons import JobReason, ReasonCode, RefusedInstance, code_value
from node.received import pixel_data_sha256

__all__ = [
    "ACCEPTED_SOP_CLASSES",
    "IntakeOutcome",
    "IntakeResult",
    "accept_instance",
    "selection_reason",
    "selection_verdict",
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
    verdict = selection_verdict(ds, min_image_size=min_image_size)
    return None if verdict is None else verdict.sentence


def selection_verdict(
    ds: Dataset,
    *,
    min_image_size: int = 256,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    transfer_syntax: str | None = None,
) -> JobReason | None:
    """Why the node will not process this instance (code and sentence), or None.

    Reads only the header: an image whose pixels would decode to more than
    `max_decoded_bytes` is refused before anything is decoded.
    """
    modality = code_value(ds.get("Modality", ""))
    if str(ds.get("Manufacturer", "") or "") == _OWN_MANUFACTURER:
        return JobReason(ReasonCode.SELECTION, "output of ptx-node itself")
    if modality not in {"CR", "DX"}:
        shown = modality if modality else ("missing" if not ds.get("Modality") else "not a code")
        return JobReason(ReasonCode.SELECTION, f"modality {shown} is not CR or DX")
    body_part_text = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body_part_text and body_part_text not in _CHEST_BODY_PARTS:
        shown = code_value(body_part_text) or "(not a code string)"
        return JobReason(ReasonCode.SELECTION, f"body part {shown} is not CHEST")
    view_text = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view_text and view_text not in _FRONTAL_VIEWS:
        shown = code_value(view_text) or "(not a code string)"
        return JobReason(ReasonCode.SELECTION, f"view position {shown} is not frontal (PA/AP)")
    try:
        check_identity(ds)
    except RefusedInstance as refused:
        return refused.reason
    return _pixel_verdict(ds, min_image_size, max_decoded_bytes, transfer_syntax)


def _header_int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    """An integer header value, or None when it is absent or not a number."""
    if keyword not in ds:
        return default
    try:
        value = ds[keyword].value
        if value is None or value == "":
            return default
        return int(value[0] if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else value)
    except Exception:  # noqa: BLE001 - a broken value (wrong length, not a number) is "not a number"
        return None


def _pixel_verdict(ds: Dataset, min_image_size: int, max_decoded_bytes: int,
                   transfer_syntax: str | None) -> JobReason | None:
    if "PixelData" not in ds:
        return JobReason(ReasonCode.NO_PIXEL_DATA, "no pixel data")
    frames = _header_int(ds, "NumberOfFrames", 1)
    samples = _header_int(ds, "SamplesPerPixel", 1)
    rows, cols = _header_int(ds, "Rows"), _header_int(ds, "Columns")
    bits = _header_int(ds, "BitsAllocated")
    if frames is None or samples is None:
        return JobReason(ReasonCode.BAD_PIXEL_MODULE, "NumberOfFrames or SamplesPerPixel is not a number")
    if frames != 1:
        return JobReason(ReasonCode.UNSUPPORTED_IMAGE, f"{frames} frames; only single-frame radiographs are processed")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if samples != 1 or photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        shown = code_value(photometric) or "no photometric interpretation"
        return JobReason(ReasonCode.UNSUPPORTED_IMAGE,
                         f"not grayscale ({shown}, {samples} samples per pixel)")
    if not rows or not cols or rows < 0 or cols < 0:
        return JobReason(ReasonCode.BAD_PIXEL_MODULE, "Rows or Columns is missing, zero or not a number")
    if bits not in (1, 8, 16, 32):
        return JobReason(ReasonCode.BAD_PIXEL_MODULE, "BitsAllocated is missing or not 1, 8, 16 or 32")
    if min(rows, cols) < min_image_size:
        return JobReason(ReasonCode.IMAGE_TOO_SMALL,
                         f"image {cols}x{rows} is smaller than {min_image_size} px: not a radiograph to segment")
    decoded = rows * cols * max(bits, 8) // 8
    if decoded > max_decoded_bytes:
        return JobReason(ReasonCode.IMAGE_TOO_LARGE,
                         f"image {cols}x{rows} at {bits} bits would decode to {decoded / 1e6:.0f} MB, "
                         f"more than the limit of {max_decoded_bytes / 1e6:.0f} MB (scp.max_decoded_bytes)")
    if transfer_syntax and not UID(transfer_syntax).is_compressed:
        expected = (rows * cols * bits + 7) // 8
        # keep_deferred: a header read with the pixel data left on disk must not load it here.
        element = ds.get_item(0x7FE00010, keep_deferred=True)
        if element is None:
            length = 0
        elif element.value is None:
            length = getattr(element, "length", 0) or 0
        else:
            length = len(element.value)
        if length < expected:
            return JobReason(ReasonCode.PIXEL_DATA_SHORT,
                             f"pixel data holds {length} bytes; {cols}x{rows} at {bits} bits needs {expected}")
    return None


_UID_CHARS = re.compile(r"[^0-9.]")


def spool_filename(sop_instance_uid: str, pixel_sha256: str) -> str:
    """A file name from the sanitized UID plus a hash: never raw header text."""
    clean = _UID_CHARS.sub("", sop_instance_uid)[:64]
    if not clean or clean != sop_instance_uid:
        clean = hashlib.sha256(sop_instance_uid.encode("utf-8", "replace")).hexdigest()[:32]
    return f"{clean}.{pixel_sha256[:12]}.dcm"


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
    received_file: Path | None = None,
    pixel_sha256: str | None = None,
) -> IntakeResult:
    """Select, spool (fsync) and record one instance; returns once the row is committed.

    ``encoded``: the instance as a DICOM file (preamble, meta, data set) exactly as it
    arrived; written as is when given, else ``ds`` is encoded. ``received_file``: the
    instance already on disk as a file (``ds`` its header, ``pixel_sha256`` its pixel
    hash), moved into the spool. Raises ``ValueError`` when the dataset lacks the
    identifying UIDs, ``SpoolFullError`` (before writing anything) below the disk watermark.
    """
    check_spool_space(config)
    sop_instance_uid = _str(ds, "SOPInstanceUID")
    if not sop_instance_uid:
        raise ValueError("dataset has no SOP Instance UID")
    transfer_syntax = None
    if file_meta is not None and "TransferSyntaxUID" in file_meta:
        transfer_syntax = str(file_meta.TransferSyntaxUID)
    pixel_sha256 = pixel_sha256 or pixel_data_sha256(ds)
    verdict = selection_verdict(ds, min_image_size=config.scp.min_image_size,
                                max_decoded_bytes=config.scp.max_decoded_bytes, transfer_syntax=transfer_syntax)
    reason = None if verdict is None else verdict.sentence

    # Core statements, not the ORM: this runs once per C-STORE, inside the sender's wait.
    engine = get_engine(config.database_url)
    existing = _existing_job(engine, sop_instance_uid, pixel_sha256)

    def spool() -> Path:
        path = config.spool_dir / "incoming" / spool_filename(sop_instance_uid, pixel_sha256)
        if received_file is not None:
            move_durably(received_file, path)
        else:
            write_durably(ds, path, file_meta=file_meta, encoded=encoded)
        return path

    if existing is not None:
        return _same_image_again(engine, existing, sop_instance_uid, spool if not reason else None)

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
        "reason_code": None if verdict is None else str(verdict.code),
        "received_at": received_at,
        "updated_at": received_at,
        "finished_at": received_at if reason else None,
    }
    if not reason:
        # File first, row second: a row never points at a file that is not on disk.
        row["spool_path"] = str(spool())
    # The unique key decides between two associations racing with the same image.
    with engine.begin() as conn:
        inserted = conn.execute(upsert_insert(engine, Job).values(**row)
                                .on_conflict_do_nothing(index_elements=["sop_instance_uid", "pixel_sha256"])
                                .returning(Job.id)).first()
        if inserted is not None:
            count_event(conn, "ptx_jobs_received_total", {"source": source})  # commits with the row
    if inserted is None:
        existing = _existing_job(engine, sop_instance_uid, pixel_sha256)
        assert existing is not None  # the row that won the race
        return _same_image_again(engine, existing, sop_instance_uid, None)
    job_id = int(inserted.id)
    if reason:
        log.info("job %s: SKIPPED instance %s: %s", job_id, sop_instance_uid, reason)
        return IntakeResult(IntakeOutcome.SKIPPED, job_id, reason)
    log.info("job %s: RECEIVED instance %s (study %s)", job_id, sop_instance_uid, row["study_instance_uid"])
    return IntakeResult(IntakeOutcome.QUEUED, job_id)


def _existing_job(engine: Any, sop_instance_uid: str, pixel_sha256: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            select(Job.id, Job.error, Job.status, Job.spool_path)
            .where(Job.sop_instance_uid == sop_instance_uid, Job.pixel_sha256 == pixel_sha256)
            .order_by(Job.id.desc())
            .limit(1)
        ).first()


def _same_image_again(engine: Any, existing: Any, sop_instance_uid: str,
                      spool: Callable[[], Path] | None) -> IntakeResult:
    """The image already has a job: a FAILED one is reopened, anything else stands.

    ``spool`` writes the copy just received into the spool (None: do not)."""
    spooled = bool(existing.spool_path) and Path(existing.spool_path).exists()
    if existing.status == JobStatus.FAILED and not spooled and spool is not None:
        # Its spool file was removed (retention, an admin): keep the one just sent.
        with engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == existing.id).values(spool_path=str(spool())))
        spooled = True
    if existing.status == JobStatus.FAILED and spooled:
        # An admin re-sending a failed study means "try again": reopen the same job.
        _reopen_failed(engine, existing.id)
        log.info("job %s: instance %s re-sent after failure; job reopened", existing.id, sop_instance_uid)
        return IntakeResult(IntakeOutcome.QUEUED, existing.id, "reopened after failure")
    log.info("job %s: instance %s received again with the same pixels", existing.id, sop_instance_uid)
    return IntakeResult(IntakeOutcome.DUPLICATE, existing.id, existing.error)


def _reopen_failed(engine: Any, job_id: int) -> None:
    """FAILED -> SENDING when its outputs are on disk (deliver them again), else RECEIVED
    (run it again); retry counters start over."""
    with engine.begin() as conn:
        from node.deliveries import DELIVERY_ORDER

        job = conn.execute(select(Job).where(Job.id == job_id)).one()
        outputs = [Path(job.output_dir) / obj.filename for obj in DELIVERY_ORDER
                   if job.output_dir and getattr(job, obj.uid_column, None)]
        has_outputs = bool(outputs) and all(p.exists() for p in outputs)
        conn.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.FAILED)
            .values(status=JobStatus.SENDING if has_outputs else JobStatus.RECEIVED, attempts=0, error=None, reason_code=None,
                    lease_until=None, next_attempt_at=None, queued_at=None, delivered_at=None,
                    updated_at=utcnow())
        )
        conn.execute(
            update(Delivery)
            .where(Delivery.job_id == job_id, Delivery.status == DeliveryStatus.FAILED)
            .values(status=DeliveryStatus.PENDING, attempts=0, first_failed_at=None, next_attempt_at=None)
        )


def read_spooled(path: str | os.PathLike[str]) -> Dataset:
    """Read a spooled instance back (the worker's entry point to the pixels)."""
    return pydicom.dcmread(path)


def transfer_syntax_of(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    return getattr(meta, "TransferSyntaxUID", None)

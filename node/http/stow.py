"""STOW-RS intake: read each part of an upload (streamed to its own file by
``node.dicomweb.MultipartRelatedReader``) as an instance, put each through the same intake as C-STORE (select, spool with fsync, job row),
enqueue the new jobs, log the request as an association, and build the standard
STOW-RS response (PS3.18 10.5).

An instance is listed in ReferencedSOPSequence only after its job row is
committed; instances the node does not process (a CT, a lateral view) are
stored and recorded as SKIPPED, exactly as over C-STORE, so an archive's
routing rule that sends too much causes no retries.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from sqlalchemy.exc import SQLAlchemyError

from node.config import NodeConfig
from node.db import Association, get_sessionmaker, utcnow
from node.dicomweb import (
    TAG_FAILED_SOP_SEQUENCE,
    TAG_FAILURE_REASON,
    TAG_REFERENCED_SOP_CLASS_UID,
    TAG_REFERENCED_SOP_INSTANCE_UID,
    TAG_REFERENCED_SOP_SEQUENCE,
    TAG_RETRIEVE_URL,
    FailureReason,
    ReceivedPart,
)
from node.intake import IntakeOutcome, accept_instance
from node.metrics import count_event, inc_stow_instance
from node.received import read_received
from node.refusals import record_refusal

__all__ = [
    "PartRefused",
    "StowInstanceResult",
    "StowRequestError",
    "StowResult",
    "log_rejected_request",
    "read_part",
    "store_parts",
]

log = logging.getLogger(__name__)

_DICOM_PART_TYPES = {"application/dicom", ""}


class StowRequestError(ValueError):
    """The request as a whole cannot be processed; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s  # the Retry-After header of a 503


@dataclasses.dataclass(frozen=True)
class StowInstanceResult:
    sop_class_uid: str | None
    sop_instance_uid: str | None
    failure_reason: FailureReason | None = None
    detail: str | None = None  # why it failed, or the SKIPPED reason
    job_id: int | None = None
    outcome: str | None = None  # IntakeOutcome value when stored


@dataclasses.dataclass(frozen=True)
class StowResult:
    instances: list[StowInstanceResult]

    @property
    def stored(self) -> list[StowInstanceResult]:
        return [i for i in self.instances if i.failure_reason is None]

    @property
    def failed(self) -> list[StowInstanceResult]:
        return [i for i in self.instances if i.failure_reason is not None]

    @property
    def http_status(self) -> int:
        """200 all stored, 202 some stored, 409 none stored (PS3.18 Table 10.5.3-1)."""
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def dicom_json(self, retrieve_url: str | None = None) -> dict[str, Any]:
        """The response dataset in the DICOM JSON model (application/dicom+json)."""
        out: dict[str, Any] = {}
        if retrieve_url:
            out[TAG_RETRIEVE_URL] = {"vr": "UR", "Value": [retrieve_url]}
        if self.stored:
            out[TAG_REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [_reference(i) for i in self.stored]}
        if self.failed:
            items = []
            for item in self.failed:
                ref = _reference(item)
                ref[TAG_FAILURE_REASON] = {"vr": "US", "Value": [int(item.failure_reason or 0)]}
                items.append(ref)
            out[TAG_FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": items}
        return out


def _reference(item: StowInstanceResult) -> dict[str, Any]:
    ref: dict[str, Any] = {}
    ref[TAG_REFERENCED_SOP_CLASS_UID] = (
        {"vr": "UI", "Value": [item.sop_class_uid]} if item.sop_class_uid else {"vr": "UI"}
    )
    ref[TAG_REFERENCED_SOP_INSTANCE_UID] = (
        {"vr": "UI", "Value": [item.sop_instance_uid]} if item.sop_instance_uid else {"vr": "UI"}
    )
    return ref


def _enqueue(config: NodeConfig, job_id: int) -> None:
    from node.broker import enqueue_job

    # Never raises; a failed publish is left to the sweeper.
    enqueue_job(config, job_id)


class PartRefused(Exception):
    """One part cannot be taken; ``reason`` is the FailureReason, the message says why."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_DICM_OFFSET = 128


def read_part(part: ReceivedPart) -> tuple[Dataset, FileMetaDataset, str | None]:
    """The data set of one part, its File Meta, and for a Part 10 file (moved into the spool
    as sent) its pixel hash: its header is then read with the pixel data left on disk.

    Accepted, since each reads unambiguously: a Part 10 file; a File Meta group without
    the 128-byte preamble and ``DICM`` (what dicomweb-client writes); a bare data set
    whose transfer syntax the part's Content-Type names (``transfer-syntax=``).
    """
    number = part.index + 1
    media, params = part.content_type
    if media not in _DICOM_PART_TYPES:
        raise PartRefused(FailureReason.CANNOT_UNDERSTAND, f"part {number} is not application/dicom")
    if part.size == 0:
        raise PartRefused(FailureReason.CANNOT_UNDERSTAND, f"part {number} is empty")
    with open(part.path, "rb") as fh:
        head = fh.read(_DICM_OFFSET + 4)
    part10 = head[_DICM_OFFSET:] == b"DICM"
    try:
        if part10 or head[:2] == b"\x02\x00":  # a File Meta element, (0002,eeee) little endian, first
            if part10:
                received = read_received(part.path)
                ds, pixel_sha256 = received.dataset, received.pixel_sha256
            else:
                ds, pixel_sha256 = pydicom.dcmread(part.path, force=True), None
            file_meta = ds.file_meta
            if "TransferSyntaxUID" not in file_meta:
                raise PartRefused(FailureReason.CANNOT_UNDERSTAND,
                                  f"part {number}: its File Meta group has no Transfer Syntax UID")
            return ds, file_meta, pixel_sha256
        named = params.get("transfer-syntax", "").strip()
        if not named:
            raise PartRefused(
                FailureReason.CANNOT_UNDERSTAND,
                f"part {number} is not a DICOM Part 10 file (no DICM prefix at byte 128), has no File Meta "
                "group, and its Content-Type names no transfer-syntax for a bare data set",
            )
        syntax = UID(named)
        if not syntax.is_transfer_syntax:
            raise PartRefused(FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED,
                              f"part {number}: transfer-syntax is not a transfer syntax UID")
        if syntax.is_deflated:
            raise PartRefused(FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED,
                              f"part {number}: a bare deflated data set is not supported; send a Part 10 file")
        with open(part.path, "rb") as fh:
            ds = read_dataset(fh, syntax.is_implicit_VR, syntax.is_little_endian)
        file_meta = FileMetaDataset()
        file_meta.TransferSyntaxUID = syntax
        if "SOPClassUID" in ds:
            file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        if "SOPInstanceUID" in ds:
            file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds, file_meta, None
    except PartRefused:
        raise
    except Exception as exc:  # pydicom raises many kinds on hostile input; none may escape
        log.info("STOW-RS: part %d unreadable: %s", number, type(exc).__name__)
        raise PartRefused(FailureReason.CANNOT_UNDERSTAND,
                          f"part {number} is not a readable DICOM data set (truncated or malformed)") from None


def _uid(ds: Dataset, keyword: str) -> str | None:
    try:
        return str(ds.get(keyword, "") or "")[:64] or None
    except Exception:  # a value that does not decode
        return None


def _store_part(
    config: NodeConfig,
    part: ReceivedPart,
    *,
    study_instance_uid: str | None,
    peer_address: str | None,
    caller: str | None,
) -> StowInstanceResult:
    try:
        ds, file_meta, pixel_sha256 = read_part(part)
    except PartRefused as exc:
        return StowInstanceResult(None, None, exc.reason, str(exc))
    sop_class, sop_instance = _uid(ds, "SOPClassUID"), _uid(ds, "SOPInstanceUID")
    if study_instance_uid and _uid(ds, "StudyInstanceUID") != study_instance_uid:
        return StowInstanceResult(
            sop_class, sop_instance, FailureReason.DATA_SET_DOES_NOT_MATCH,
            "Study Instance UID differs from the one in the request URL",
        )
    try:
        result = accept_instance(
            ds, file_meta=file_meta, config=config, source="stow", calling_ae=caller, calling_host=peer_address,
            received_file=part.path if pixel_sha256 else None, pixel_sha256=pixel_sha256,
        )
    except ValueError as exc:
        return StowInstanceResult(sop_class, sop_instance, FailureReason.DATA_SET_DOES_NOT_MATCH, str(exc))
    except OSError as exc:
        log.error("STOW-RS: could not spool instance %s: %s", sop_instance, exc)
        return StowInstanceResult(sop_class, sop_instance, FailureReason.OUT_OF_RESOURCES, f"spool write failed: {exc}")
    except SQLAlchemyError as exc:  # database down: the caller must retry, nothing was committed
        log.error("STOW-RS: intake of instance %s failed: %s", sop_instance, type(exc).__name__)
        return StowInstanceResult(sop_class, sop_instance, FailureReason.PROCESSING_FAILURE,
                                  "the job database is unavailable; retry later")
    except Exception as exc:  # a header value pydicom cannot decode
        log.warning("STOW-RS: instance %s refused: %s", sop_instance, type(exc).__name__)
        return StowInstanceResult(sop_class, sop_instance, FailureReason.CANNOT_UNDERSTAND,
                                  f"part {part.index + 1} has a header value that cannot be decoded")
    if result.outcome == IntakeOutcome.QUEUED:
        _enqueue(config, result.job_id)
    return StowInstanceResult(
        sop_class, sop_instance, None, result.reason, job_id=result.job_id, outcome=result.outcome.value
    )


def store_parts(
    config: NodeConfig,
    parts: list[ReceivedPart],
    *,
    study_instance_uid: str | None = None,
    peer_address: str | None = None,
    peer_port: int | None = None,
    caller: str | None = None,
) -> StowResult:
    """Take every instance of a received STOW-RS body; logs the request in ``associations``."""
    started_at = utcnow()
    results = [
        _store_part(config, part, study_instance_uid=study_instance_uid, peer_address=peer_address, caller=caller)
        for part in parts
    ]
    outcome = StowResult(results)
    for item in results:
        inc_stow_instance(item.outcome or "failed")
        if item.failure_reason is not None:
            log.warning("STOW-RS from %s: instance %s failed: 0x%04X %s", peer_address, item.sop_instance_uid,
                        int(item.failure_reason), item.detail)
    _log_association(
        config, peer_address=peer_address, peer_port=peer_port, caller=caller, started_at=started_at,
        n_accepted=len(outcome.stored), n_rejected=len(outcome.failed),
    )
    return outcome


def log_rejected_request(
    config: NodeConfig, *, peer_address: str | None, peer_port: int | None, caller: str | None, reason: str
) -> None:
    """Count a STOW-RS request refused as a whole (bad token, media type, size, timeout)."""
    record_refusal(config.database_url, protocol="stow", peer_address=peer_address, peer_port=peer_port,
                   calling_ae=caller, called_ae=None, reason=reason)


def _log_association(
    config: NodeConfig,
    *,
    peer_address: str | None,
    peer_port: int | None,
    caller: str | None,
    started_at: Any,
    n_accepted: int,
    n_rejected: int,
) -> None:
    try:
        with get_sessionmaker(config.database_url)() as session:
            session.add(
                Association(
                    protocol="stow",
                    calling_ae=(caller or None) and caller[:16],
                    called_ae=None,
                    peer_address=(peer_address or None) and peer_address[:64],
                    peer_port=peer_port,
                    started_at=started_at,
                    ended_at=utcnow(),
                    accepted=True,
                    instances_accepted=n_accepted,
                    instances_rejected=n_rejected,
                )
            )
            session.flush()
            count_event(session.connection(), "ptx_associations_total",
                        {"protocol": "stow", "accepted": "true"})
            session.commit()
    except Exception:  # the log must not turn a stored upload into a failure
        log.exception("STOW-RS: could not record the request in the association log")

"""STOW-RS intake: split a spooled multipart/related upload into instances, put
each through the same intake as C-STORE (select, spool with fsync, job row),
enqueue the new jobs, log the request as an association, and build the standard
STOW-RS response (PS3.18 10.5).

An instance is listed in ReferencedSOPSequence only after its job row is
committed; instances the node does not process (a CT, a lateral view) are
stored and recorded as SKIPPED, exactly as over C-STORE, so an archive's
routing rule that sends too much causes no retries.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import mmap
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

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
    MultipartError,
    parse_multipart_related,
)
from node.intake import IntakeOutcome, accept_instance
from node.metrics import inc_stow_instance

__all__ = ["StowInstanceResult", "StowRequestError", "StowResult", "log_rejected_request", "store_upload"]

log = logging.getLogger(__name__)

_DICOM_PART_TYPES = {"application/dicom", ""}


class StowRequestError(ValueError):
    """The request as a whole cannot be processed; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
    from node.tasks import enqueue_job

    # Never raises; a failed publish is left to the sweeper.
    enqueue_job(config, job_id)


def _store_part(
    config: NodeConfig,
    data: mmap.mmap | bytes,
    start: int,
    end: int,
    *,
    part_type: str,
    study_instance_uid: str | None,
    peer_address: str | None,
    caller: str | None,
) -> StowInstanceResult:
    if part_type not in _DICOM_PART_TYPES:
        return StowInstanceResult(None, None, FailureReason.CANNOT_UNDERSTAND, f"part type {part_type} is not application/dicom")
    try:
        ds = pydicom.dcmread(io.BytesIO(data[start:end]))
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError) as exc:
        return StowInstanceResult(None, None, FailureReason.CANNOT_UNDERSTAND, f"not a DICOM Part 10 file: {exc}")
    sop_class = str(ds.get("SOPClassUID", "") or "") or None
    sop_instance = str(ds.get("SOPInstanceUID", "") or "") or None
    if study_instance_uid and str(ds.get("StudyInstanceUID", "") or "") != study_instance_uid:
        return StowInstanceResult(
            sop_class, sop_instance, FailureReason.DATA_SET_DOES_NOT_MATCH,
            "Study Instance UID differs from the one in the request URL",
        )
    try:
        result = accept_instance(
            ds, file_meta=ds.file_meta, config=config, source="stow", calling_ae=caller, calling_host=peer_address
        )
    except ValueError as exc:
        return StowInstanceResult(sop_class, sop_instance, FailureReason.DATA_SET_DOES_NOT_MATCH, str(exc))
    except OSError as exc:
        log.error("STOW-RS: could not spool instance %s: %s", sop_instance, exc)
        return StowInstanceResult(sop_class, sop_instance, FailureReason.OUT_OF_RESOURCES, f"spool write failed: {exc}")
    except Exception as exc:  # database down: the caller must retry, nothing was committed
        log.exception("STOW-RS: intake of instance %s failed", sop_instance)
        return StowInstanceResult(sop_class, sop_instance, FailureReason.PROCESSING_FAILURE, type(exc).__name__)
    if result.outcome == IntakeOutcome.QUEUED:
        _enqueue(config, result.job_id)
    return StowInstanceResult(
        sop_class, sop_instance, None, result.reason, job_id=result.job_id, outcome=result.outcome.value
    )


def store_upload(
    config: NodeConfig,
    body_path: Path,
    content_type: str,
    *,
    study_instance_uid: str | None = None,
    peer_address: str | None = None,
    peer_port: int | None = None,
    caller: str | None = None,
) -> StowResult:
    """Take every instance of a spooled STOW-RS body; logs the request in ``associations``.

    Raises ``StowRequestError`` (400/415) when the body is not a multipart/related
    upload of application/dicom parts.
    """
    started_at = utcnow()
    size = body_path.stat().st_size
    if size == 0:
        raise StowRequestError(400, "empty request body")
    with open(body_path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            root_type, parts = parse_multipart_related(data, content_type)
        except MultipartError as exc:
            status = 415 if "is not multipart/related" in str(exc) else 400
            raise StowRequestError(status, str(exc)) from None
        root_type = root_type.strip().lower()
        if root_type and root_type != "application/dicom":
            # The metadata + bulk data form (application/dicom+json / +xml) is not supported.
            raise StowRequestError(415, f"multipart/related type={root_type} is not supported; send application/dicom parts")
        if not parts:
            raise StowRequestError(400, "multipart/related body has no parts")
        results = [
            _store_part(
                config, data, part.start, part.end, part_type=part.content_type,
                study_instance_uid=study_instance_uid, peer_address=peer_address, caller=caller,
            )
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
        accepted=True, reject_reason=None, n_accepted=len(outcome.stored), n_rejected=len(outcome.failed),
    )
    return outcome


def log_rejected_request(
    config: NodeConfig, *, peer_address: str | None, peer_port: int | None, caller: str | None, reason: str
) -> None:
    """Record a STOW-RS request refused before reading its body (bad token, bad media type)."""
    _log_association(
        config, peer_address=peer_address, peer_port=peer_port, caller=caller, started_at=utcnow(),
        accepted=False, reject_reason=reason, n_accepted=0, n_rejected=0,
    )


def _log_association(
    config: NodeConfig,
    *,
    peer_address: str | None,
    peer_port: int | None,
    caller: str | None,
    started_at: Any,
    accepted: bool,
    reject_reason: str | None,
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
                    accepted=accepted,
                    reject_reason=reject_reason,
                    instances_accepted=n_accepted,
                    instances_rejected=n_rejected,
                )
            )
            session.commit()
    except Exception:  # the log must not turn a stored upload into a failure
        log.exception("STOW-RS: could not record the request in the association log")

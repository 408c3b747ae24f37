"""Sending the node's outputs to a PACS: C-STORE SCU, or STOW-RS for DICOMweb archives.

``send_objects`` never raises: it says, for every file, whether the destination stored
it, refused it for good (no presentation context, SOP class not supported) or failed
in a way worth retrying (down, connection reset, out of resources, unexpected error).
"""

from __future__ import annotations

import enum
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from node.config import Destination, NodeConfig
from node.status import describe_status, is_refusal, is_success
from node.tls import TlsConfigError, client_context

__all__ = [
    "DeliveryError",
    "ObjectResult",
    "SendOutcome",
    "open_association",
    "send_dimse",
    "send_objects",
]

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    """A destination did not take the outputs; the message says why."""


class SendOutcome(enum.StrEnum):
    STORED = "stored"
    REFUSED = "refused"  # permanent: the destination will never take this object
    FAILED = "failed"  # worth retrying later


def _connection_refused(host: str | None, port: int | None, *, timeout_s: float) -> str | None:
    """Why a TCP connection cannot be made, in words; pynetdicom reports all of these as an
    abort. None when the port answers (the association then says the rest)."""
    try:
        with socket.create_connection((host or "", int(port or 0)), timeout=timeout_s):
            return None
    except ConnectionRefusedError:
        return "connection refused: nothing listens on that port"
    except TimeoutError:
        return f"connection timed out after {timeout_s:g} s"
    except socket.gaierror as exc:
        return f"host {host!r} not found ({exc.strerror})"
    except OSError as exc:
        # strerror is the OS's words; the exception's own text may carry Python detail
        return f"cannot connect: {exc.strerror or 'connection failed'}"


@dataclass(frozen=True)
class ObjectResult:
    path: Path
    outcome: SendOutcome
    reason: str | None = None


def send_objects(config: NodeConfig, dest: Destination, paths: list[Path]) -> list[ObjectResult]:
    """Send each file to one destination, in order; one result per file, never raises."""
    try:
        if dest.kind == "stow":
            return [_stow_one(dest, path) for path in paths]
        return _dimse_objects(dest, paths, calling_ae_title=config.delivery.calling_ae_title,
                              timeout_s=config.delivery.timeout_s)
    except Exception as exc:  # a bug or a library surprise must not end the job: retry later
        log.exception("delivery to %s: unexpected error", dest.name)
        reason = f"{dest.name}: {_network_reason(exc)}"
        return [ObjectResult(p, SendOutcome.FAILED, reason) for p in paths]


def _network_reason(exc: BaseException) -> str:
    """A reason an admin reads, not a traceback line."""
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the destination"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        return f"network error ({exc.strerror or 'connection failed'})"
    return "unexpected error while sending (details in the node log)"


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


def open_association(dest: Destination, sop_classes: list[str], *, calling_ae_title: str,
                     timeout_s: float) -> Association:
    """The one place that opens an association to a destination (DICOM TLS when configured).

    Raises ``DeliveryError`` when the destination's TLS settings cannot be loaded."""
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 10)
    for sop_class in sorted(set(sop_classes)):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls_args = None
    if dest.tls.enabled:
        try:
            tls_args = (client_context(dest.tls, where=f"destination {dest.name}"), str(dest.host))
        except TlsConfigError as exc:
            raise DeliveryError(str(exc)) from None
    return ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)


def _dimse_objects(dest: Destination, paths: list[Path], *, calling_ae_title: str,
                   timeout_s: float) -> list[ObjectResult]:
    datasets: list[Dataset] = [pydicom.dcmread(p) for p in paths]
    try:
        assoc = open_association(dest, [str(ds.SOPClassUID) for ds in datasets],
                                 calling_ae_title=calling_ae_title, timeout_s=timeout_s)
    except DeliveryError as exc:
        return [ObjectResult(p, SendOutcome.FAILED, str(exc)) for p in paths]
    if not assoc.is_established:
        how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        if not assoc.is_rejected:
            # pynetdicom reports a refused or unreachable port as an abort: find out which.
            how = _connection_refused(dest.host, dest.port, timeout_s=min(timeout_s, 10)) or how
        if dest.tls.enabled and not assoc.is_rejected and how == "aborted":
            how += "; DICOM TLS: check the peer's certificate and CA, and that it speaks TLS on this port"
        reason = f"{dest.name}: association with {dest.ae_title}@{dest.host}:{dest.port} failed ({how})"
        return [ObjectResult(p, SendOutcome.FAILED, reason) for p in paths]
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    results: list[ObjectResult] = []
    try:
        for path, ds in zip(paths, datasets, strict=True):
            sop_class = str(ds.SOPClassUID)
            if sop_class not in accepted:
                results.append(ObjectResult(path, SendOutcome.REFUSED,
                                            f"{dest.name} accepts no presentation context for {_sop_class_name(sop_class)}"))
                continue
            if not assoc.is_established:
                results.append(ObjectResult(path, SendOutcome.FAILED, f"{dest.name}: connection lost"))
                continue
            try:
                status = assoc.send_c_store(ds)
            except Exception as exc:
                results.append(ObjectResult(path, SendOutcome.FAILED, f"{dest.name}: {_network_reason(exc)}"))
                continue
            if not status or "Status" not in status:
                results.append(ObjectResult(path, SendOutcome.FAILED,
                                            f"{dest.name}: no C-STORE response (connection lost or timed out)"))
                continue
            code = int(status.Status)
            if is_success(code):
                results.append(ObjectResult(path, SendOutcome.STORED))
            else:
                outcome = SendOutcome.REFUSED if is_refusal(code) else SendOutcome.FAILED
                results.append(ObjectResult(path, outcome,
                                            f"{dest.name}: C-STORE of {_sop_class_name(sop_class)} answered "
                                            f"{describe_status(code)}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _stow_one(dest: Destination, path: Path) -> ObjectResult:
    """One object per STOW-RS request, so each gets its own answer."""
    from node.dicomweb import StowError, stow_store

    try:
        stow_store(dest, [path])
    except StowError as exc:
        return ObjectResult(path, SendOutcome.REFUSED if exc.permanent else SendOutcome.FAILED, str(exc))
    return ObjectResult(path, SendOutcome.STORED)


def send_dimse(dest: Destination, paths: list[Path], *, calling_ae_title: str, timeout_s: float) -> int:
    """C-STORE every file; returns how many were stored, raises ``DeliveryError`` otherwise."""
    return _all_stored(dest, _dimse_objects(dest, paths, calling_ae_title=calling_ae_title, timeout_s=timeout_s))


def _all_stored(dest: Destination, results: list[ObjectResult]) -> int:
    for result in results:
        if result.outcome != SendOutcome.STORED:
            raise DeliveryError(result.reason or f"{dest.name}: not stored")
    return len(results)

"""Sending the node's outputs to a PACS: C-STORE SCU, or STOW-RS for DICOMweb archives."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from node.config import Destination, NodeConfig
from node.status import describe_status, is_success

__all__ = ["DeliveryError", "send_dimse", "send_to_destination"]

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    """A destination did not take the outputs; the message says why."""


def send_to_destination(config: NodeConfig, dest: Destination, paths: list[Path]) -> int:
    """Send every file to one destination; returns how many it stored."""
    if dest.kind == "stow":
        from node.dicomweb import StowError, stow_store

        try:
            return stow_store(dest, paths)
        except StowError as exc:
            raise DeliveryError(str(exc)) from exc
    return send_dimse(
        dest, paths, calling_ae_title=config.delivery.calling_ae_title, timeout_s=config.delivery.timeout_s
    )


def send_dimse(dest: Destination, paths: list[Path], *, calling_ae_title: str, timeout_s: float) -> int:
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 10)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise DeliveryError(f"{dest.name}: association with {dest.ae_title}@{dest.host}:{dest.port} failed ({reason})")
    stored = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if not status or "Status" not in status:
                raise DeliveryError(f"{dest.name}: no C-STORE response for {ds.SOPInstanceUID} (connection lost or timed out)")
            code = int(status.Status)
            if not is_success(code):
                raise DeliveryError(f"{dest.name}: C-STORE of {ds.SOPInstanceUID} answered {describe_status(code)}")
            stored += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return stored

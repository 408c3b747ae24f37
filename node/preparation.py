"""What the worker does around the model: check the instance, prepare the header the
outputs copy, decode the pixels, build the outputs, and name the reason when it stops.

Kept apart from the job bookkeeping (node.pipeline) so the header-mutation test runs
exactly this code on thousands of headers without a database or a network.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import UID

from node.config import NodeConfig
from node.intake import selection_verdict
from node.outputs import (
    DELIVERY_ORDER,
    AlgorithmInfo,
    OutputKind,
    OutputOptions,
    ReferencedSeg,
    build_gsps,
    build_overlay,
    build_seg,
    build_sr,
)
from node.outputs.regions import Region
from node.outputs.sanitize import SourceHeader, prepare_source_header
from node.reasons import JobReason, ReasonCode, RefusedInstance

__all__ = ["BuiltOutputs", "PreparedInstance", "build_outputs", "prepare_instance", "reason_for_failure"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedInstance:
    dataset: pydicom.Dataset  # as received (pixels included)
    header: SourceHeader  # what every output copies
    source: Any  # model.SourceImage: display-normalized pixels and spacing


@dataclass(frozen=True)
class BuiltOutputs:
    objects: dict[OutputKind, pydicom.Dataset]  # in delivery order (SEG, SR, GSPS, SC)
    rgb: np.ndarray | None  # the SC's picture, for the overlay PNG

    @property
    def seg(self) -> pydicom.Dataset | None:
        return self.objects.get(OutputKind.SEG)

    @property
    def sc(self) -> pydicom.Dataset | None:
        return self.objects.get(OutputKind.SC)


def prepare_instance(ds: pydicom.Dataset, config: NodeConfig) -> PreparedInstance:
    """Check, prepare and decode one instance; raises `RefusedInstance` with the reason."""
    from model import source_image_from_dataset

    meta = getattr(ds, "file_meta", None)
    transfer_syntax = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None
    verdict = selection_verdict(ds, min_image_size=config.scp.min_image_size,
                                max_decoded_bytes=config.scp.max_decoded_bytes, transfer_syntax=transfer_syntax)
    if verdict is not None:
        raise RefusedInstance(verdict)
    header = prepare_source_header(ds, fallback_character_set=config.outputs.fallback_character_set)
    try:
        source = source_image_from_dataset(ds)
    except Exception as exc:  # noqa: BLE001 - every decoder failure is "cannot decode"; details to the log
        log.info("pixel data could not be decoded (%s)", type(exc).__name__, exc_info=True)
        raise RefusedInstance(JobReason(ReasonCode.UNDECODABLE, _undecodable_sentence(transfer_syntax))) from None
    return PreparedInstance(ds, header, source)


def _undecodable_sentence(transfer_syntax: str | None) -> str:
    name = UID(transfer_syntax).name if transfer_syntax else ""
    # the name only when it is a transfer syntax the standard defines, never raw header text
    if name and name != transfer_syntax:
        return f"the pixel data could not be decoded ({name})"
    return "the pixel data could not be decoded"


def build_outputs(
    prepared: PreparedInstance,
    prediction: Any,
    kinds: Iterable[OutputKind],
    *,
    algorithm: AlgorithmInfo,
    options: OutputOptions,
    uids: Mapping[OutputKind, tuple[str, str]],
    regions: Sequence[Region] | None = None,
) -> BuiltOutputs:
    """The objects of `kinds`, from the prepared header; `uids` holds (series UID, SOP UID) of
    every object the job writes, so an SR built alone still references the job's SEG.
    `regions`: `regions_for(prepared.header.dataset, prediction, options)` when the caller has
    them (None: the SR and the GSPS compute them)."""
    header = prepared.header.dataset
    wanted = set(kinds)
    missing = sorted(str(kind) for kind in wanted if kind not in uids)
    if missing:
        raise ValueError(f"no UIDs for {', '.join(missing)}")
    seg_reference = ReferencedSeg(*uids[OutputKind.SEG]) if OutputKind.SEG in uids else None
    objects: dict[OutputKind, pydicom.Dataset] = {}
    rgb = None
    for kind in (k for k in DELIVERY_ORDER if k in wanted):
        series_uid, sop_uid = uids[kind]
        common = {"algorithm": algorithm, "series_instance_uid": series_uid, "sop_instance_uid": sop_uid,
                  "options": options}
        if kind is OutputKind.SEG:
            objects[kind] = build_seg(header, prediction.mask, **common)
        elif kind is OutputKind.SR:
            objects[kind] = build_sr(header, prediction, seg=seg_reference, regions=regions, **common)
        elif kind is OutputKind.GSPS:
            objects[kind] = build_gsps(header, prediction, regions=regions, **common)
        else:
            objects[kind], rgb = build_overlay(header, prepared.source.pixels, prediction, **common)
    return BuiltOutputs(objects, rgb)


def reason_for_failure(exc: BaseException, job_id: int | None = None) -> JobReason:
    """The reason recorded for an unexpected exception: never its text (that goes to the log)."""
    if isinstance(exc, RefusedInstance):
        return exc.reason
    try:
        from model.checkpoint import CheckpointError
    except ImportError:  # pragma: no cover - model is part of the package
        CheckpointError = ()  # type: ignore[assignment,misc]  # noqa: N806
    if isinstance(exc, CheckpointError):
        return JobReason(ReasonCode.MODEL_UNAVAILABLE,
                         "the model checkpoint failed verification (weights missing, or their sha256 hash does "
                         "not match the manifest); see the worker log")
    if isinstance(exc, ModelNotConfigured):
        return JobReason(ReasonCode.MODEL_UNAVAILABLE,
                         "no model checkpoint is configured and untrained serving is not allowed")
    where = f" under job {job_id}" if job_id is not None else ""
    return JobReason(ReasonCode.INTERNAL, f"an internal error stopped processing; the worker log has the details{where}")


class ModelNotConfigured(RuntimeError):
    """No checkpoint and no --allow-untrained."""

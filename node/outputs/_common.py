"""Pieces shared by the writers (SEG, SR, GSPS, SC): input checks and the texts they carry."""

from __future__ import annotations

import re
import socket
from importlib import metadata
from typing import Protocol

import numpy as np
import pydicom

from node.outputs.options import AlgorithmInfo, OutputOptions
from node.outputs.sanitize import sanitize_source

DISCLAIMER = "NOT FOR DIAGNOSTIC USE"
UNTRAINED = "UNTRAINED"
FINDING_POSITIVE = "Pneumothorax suspected"
FINDING_NEGATIVE = "No pneumothorax detected"
MODEL_NAME = "ptx-node"

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


class PredictionLike(Protocol):
    """What the writers read off `model.postprocess.Prediction`."""

    mask: np.ndarray
    score: float
    positive: bool
    area_px: int
    area_mm2: float | None
    n_components: int


def node_version() -> str:
    try:
        return metadata.version("ptx-node")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def device_serial_number() -> str:
    # which worker wrote an object is what admins need when outputs disagree
    return (socket.gethostname() or "unknown")[:64]


def software_versions(algorithm: AlgorithmInfo) -> list[str]:
    return [f"{MODEL_NAME} {node_version()}"[:64], f"{algorithm.name} {algorithm.version}"[:64]]


def equipment(algorithm: AlgorithmInfo, options: OutputOptions) -> dict[str, object]:
    """The General Equipment attributes of every object the node writes, as highdicom's
    constructors take them: who made it, which software, which worker (the host)."""
    return {
        "manufacturer": options.manufacturer,
        "manufacturer_model_name": MODEL_NAME,
        "software_versions": software_versions(algorithm),
        "device_serial_number": device_serial_number(),
    }


def check_uid(value: str, what: str) -> str:
    if not isinstance(value, str) or len(value) > 64 or not _UID.match(value):
        raise ValueError(f"{what} must be a valid DICOM UID of at most 64 characters.")
    return value


def check_source(source: pydicom.Dataset) -> tuple[int, int]:
    """Return (rows, columns) of a single-frame image, or raise ValueError."""
    if not isinstance(source, pydicom.Dataset):
        raise TypeError("source must be a pydicom.Dataset.")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not source.get(keyword):
            raise ValueError(f"Source dataset has no {keyword}.")
    if "Rows" not in source or "Columns" not in source:
        raise ValueError("Source dataset has no Rows/Columns.")
    if int(source.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError("Source dataset must be a single-frame image.")
    return int(source.Rows), int(source.Columns)


def check_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Return `mask` as a bool array of the source's shape, or raise."""
    if not isinstance(mask, np.ndarray):
        raise TypeError("mask must be a numpy array.")
    if mask.shape != shape:
        raise ValueError(
            f"mask shape {mask.shape} does not match the source image {shape} "
            "(masks are written at the source resolution)."
        )
    if mask.dtype == np.bool_:
        return mask
    if np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all():
        return mask.astype(bool)
    raise ValueError("mask must be boolean (or integer 0/1).")


def checked_mask(
    source: pydicom.Dataset, mask: np.ndarray, *, algorithm: AlgorithmInfo, series_instance_uid: str,
    sop_instance_uid: str,
) -> np.ndarray:
    """The checks every writer starts with, in this order: the source, the mask (returned as
    bool), the output UIDs, the algorithm."""
    mask = check_mask(mask, check_source(source))
    check_uid(series_instance_uid, "series_instance_uid")
    check_uid(sop_instance_uid, "sop_instance_uid")
    if not isinstance(algorithm, AlgorithmInfo):
        raise TypeError("algorithm must be an AlgorithmInfo.")
    return mask


def source_header(source: pydicom.Dataset, options: OutputOptions) -> pydicom.Dataset:
    """The header a writer copies: `sanitize_source` with the configured fallback character set."""
    return sanitize_source(source, fallback_character_set=options.fallback_character_set)


def algorithm_version(algorithm: AlgorithmInfo) -> str:
    """The version the SEG and the SR record: "1.0 UNTRAINED" or "1.0 sha256:<12 hex>" (LO, at most 64)."""
    if algorithm.untrained:
        return f"{algorithm.version} {UNTRAINED}"[:64]
    return f"{algorithm.version} sha256:{algorithm.short_hash}"[:64]


def series_description(kind: str, algorithm: AlgorithmInfo, options: OutputOptions) -> str:
    """E.g. "PTX SEG UNTRAINED (NOT FOR DIAGNOSTIC USE)"; LO, so at most 64 characters.

    A model with a caveat (a demo model) is described by the caveat alone: it must fit.
    """
    if algorithm.caveat:
        return algorithm.caveat.upper()
    text = f"PTX {kind}"
    if algorithm.untrained:
        text += f" {UNTRAINED}"
    if options.diagnostic_disclaimer:
        text += f" ({DISCLAIMER})"
    return text[:64]


def algorithm_sentence(algorithm: AlgorithmInfo) -> str:
    text = f"Automatic pneumothorax segmentation by {algorithm.name} {algorithm.version}"
    if algorithm.untrained:
        text += f" ({UNTRAINED} MODEL: random weights, output is meaningless)"
    else:
        text += f" (checkpoint sha256 {algorithm.checkpoint_sha256})"
    if algorithm.caveat:
        text += f"; {algorithm.caveat}"
    return text + "."


def with_disclaimer(text: str, options: OutputOptions) -> str:
    return f"{DISCLAIMER}. {text}" if options.diagnostic_disclaimer else text


def area_text(prediction: PredictionLike) -> str:
    """'12,345 px (45.6 cm2)'; the physical area only when it is known and plausible."""
    text = f"{int(prediction.area_px):,} px"
    area_mm2 = prediction.area_mm2
    # a zero spacing in the header gives 0 mm2 for a non-empty mask: not a known area
    if area_mm2 is not None and np.isfinite(area_mm2) and (area_mm2 > 0 or prediction.area_px == 0):
        if area_mm2 >= 100.0:
            text += f" ({area_mm2 / 100.0:.1f} cm2)"
        else:
            text += f" ({area_mm2:.0f} mm2)"
    return text


def finding_sentence(prediction: PredictionLike) -> str:
    if prediction.positive:
        return (
            f"{FINDING_POSITIVE}: max probability {float(prediction.score):.2f}, "
            f"area {area_text(prediction)}, {int(prediction.n_components)} region(s)."
        )
    return f"{FINDING_NEGATIVE}: max probability {float(prediction.score):.2f}."


def set_body_part(dataset: pydicom.Dataset, header: pydicom.Dataset) -> None:
    """BodyPartExamined from the source, which tells validators the part is unpaired (no
    Laterality due); without it, Laterality empty (Type 2C: "unknown")."""
    if header.get("BodyPartExamined"):
        dataset.BodyPartExamined = header.BodyPartExamined
    else:
        dataset.Laterality = ""

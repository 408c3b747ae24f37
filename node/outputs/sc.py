"""Secondary-capture overlay: the picture from `render` as an RGB SC in the source's study."""

from __future__ import annotations

import datetime
import re

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from node.outputs._common import (
    MODEL_NAME,
    PredictionLike,
    algorithm_sentence,
    check_source,
    checked_mask,
    finding_sentence,
    series_description,
    set_body_part,
    software_versions,
    source_header,
    with_disclaimer,
)
from node.outputs.options import AlgorithmInfo, OutputOptions
from node.outputs.render import render_overlay

__all__ = ["build_overlay"]

_BIPED_DIRECTION = re.compile(r"^[APRLHF]{1,3}$")
# DCM 121322 "Source image for image processing operation"
_SOURCE_PURPOSE = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")


def build_overlay(
    source: pydicom.Dataset,
    display: np.ndarray,
    prediction: PredictionLike,
    *,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    options: OutputOptions,
) -> tuple[hd.sc.SCImage, np.ndarray]:
    """The SC dataset and its RGB pixels (also what `write_png` writes for the demo)."""
    shape = check_source(source)
    if not isinstance(display, np.ndarray) or display.shape != shape:
        raise ValueError(f"display must be an array of the source image's shape {shape}.")
    checked_mask(source, prediction.mask, algorithm=algorithm, series_instance_uid=series_instance_uid,
                 sop_instance_uid=sop_instance_uid)

    rgb = render_overlay(display, prediction, algorithm=algorithm, options=options)
    header = source_header(source, options)
    now = datetime.datetime.now()
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid,
        series_number=options.sc_series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=options.manufacturer,
        pixel_spacing=_pixel_spacing(header),
        # placeholder for highdicom's check; replaced by the source's own value below
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        manufacturer_model_name=MODEL_NAME,
        software_versions=software_versions(algorithm),
        series_description=series_description("OVERLAY", algorithm, options),
        series_date=now.date(),
        series_time=now.time(),
        institution_name=options.institution_name,
    )
    # the overlay shares the source's pixel grid, hence its orientation; unknown stays empty
    sc.PatientOrientation = _patient_orientation(header)
    set_body_part(sc, header)
    if header.get("LossyImageCompression") == "01":
        # pixels derived from a lossy source stay marked lossy (PS3.3 C.7.6.1.1.5)
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if header.get(keyword):
                setattr(sc, keyword, header[keyword].value)
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = "Pneumothorax segmentation overlay"
    sc.SourceImageSequence = [_source_reference(header)]
    sc.ImageComments = with_disclaimer(
        f"{finding_sentence(prediction)} {algorithm_sentence(algorithm)}", options
    )
    return sc, rgb


def _pixel_spacing(header: pydicom.Dataset) -> tuple[float, float] | None:
    # only PixelSpacing is in the patient plane; sanitize_source dropped zero spacings
    spacing = header.get("PixelSpacing")
    if spacing is None or len(spacing) != 2:
        return None
    return float(spacing[0]), float(spacing[1])


def _patient_orientation(header: pydicom.Dataset) -> list[str] | str:
    values = header.get("PatientOrientation")
    if values is None or isinstance(values, str) or len(values) != 2:
        return ""
    if all(_BIPED_DIRECTION.match(str(value)) for value in values):
        return [str(value) for value in values]
    return ""


def _source_reference(header: pydicom.Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [_SOURCE_PURPOSE]
    return item

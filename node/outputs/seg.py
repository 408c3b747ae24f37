"""DICOM Segmentation of the pneumothorax mask, at the source image's full resolution."""

from __future__ import annotations

import datetime

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from node.outputs._common import (
    algorithm_sentence,
    algorithm_version,
    checked_mask,
    equipment,
    series_description,
    source_header,
    with_disclaimer,
)
from node.outputs.options import AlgorithmInfo, OutputOptions

__all__ = ["SEGMENT_LABEL", "build_seg", "algorithm_identification"]

SEGMENT_LABEL = "Pneumothorax"
_CONTENT_LABEL = "PNEUMOTHORAX"
# the orientation OHIF needs to place a SEG of a projection radiograph (DESIGN.md)
_IDENTITY_ORIENTATION = ["1", "0", "0", "0", "1", "0"]
_ORIGIN = ["0", "0", "0"]
_NOMINAL_SLICE_THICKNESS = "1"
# said in the SEG whenever its PixelMeasures are the viewers' placeholder, not a calibration
NOMINAL_SPACING_NOTE = (
    "Pixel spacing 1 mm is nominal: the source image has no usable pixel spacing, "
    "so no distance or area in this object is a measurement."
)


def algorithm_identification(algorithm: AlgorithmInfo) -> hd.AlgorithmIdentificationSequence:
    """Name, family (Artificial Intelligence), version with checkpoint hash; full hash as a parameter."""
    if algorithm.untrained:
        parameters = {"checkpoint": "none (untrained, random weights)"}
    else:
        parameters = {"checkpoint_sha256": str(algorithm.checkpoint_sha256)}
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm_version(algorithm),
        parameters=parameters,
    )


def build_seg(
    source: pydicom.Dataset,
    mask: np.ndarray,
    *,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    options: OutputOptions,
) -> hd.seg.Segmentation:
    """A BINARY SEG with one segment "Pneumothorax" (SNOMED CT 36118008) in the source's study.

    The frame is written even when `mask` is empty; it references the source image in
    ReferencedSeriesSequence and per frame (DerivationImageSequence), as OHIF needs.
    """
    mask = checked_mask(source, mask, algorithm=algorithm, series_instance_uid=series_instance_uid,
                        sop_instance_uid=sop_instance_uid)
    header = source_header(source, options)
    projection = not _has_patient_geometry(header)
    if projection and "FrameOfReferenceUID" in header:
        # a frame of reference without orientation/position cannot place the frame
        del header.FrameOfReferenceUID

    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.cid7150.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Pneumothorax,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(algorithm),
        anatomic_regions=[codes.SCT.Chest],
        display_color=hd.color.CIELabColor.from_rgb(*options.outline_color),
    )
    now = datetime.datetime.now()
    seg = hd.seg.Segmentation(
        source_images=[header],
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=series_instance_uid,
        series_number=options.seg_series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        **equipment(algorithm, options),
        content_label=_CONTENT_LABEL,
        content_description=with_disclaimer("Pneumothorax segmentation", options)[:64],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,  # an omitted empty frame has shifted overlays in viewers
        series_description=series_description("SEG", algorithm, options),
        series_date=now.date(),
        series_time=now.time(),
        institution_name=options.institution_name,
    )
    nominal_spacing = projection and _add_projection_geometry(seg)
    if header.get("BodyPartExamined"):
        seg.BodyPartExamined = header.BodyPartExamined
    comments = algorithm_sentence(algorithm)
    if nominal_spacing:
        comments += f" {NOMINAL_SPACING_NOTE}"
    seg.ImageComments = with_disclaimer(comments, options)
    return seg


def _has_patient_geometry(header: pydicom.Dataset) -> bool:
    return all(
        keyword in header
        for keyword in ("FrameOfReferenceUID", "ImageOrientationPatient", "ImagePositionPatient")
    )


def _add_projection_geometry(seg: hd.seg.Segmentation) -> bool:
    """PlaneOrientation (shared) and PlanePosition (per frame) for a radiograph without them;
    True when the pixel spacing written is the nominal one (the source has none).

    OHIF 3 never loads a SEG of a projection image without these (DESIGN.md); no frame
    of reference is added, so dciodvfy does not ask for a slice thickness.
    """
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = Dataset()
    orientation.ImageOrientationPatient = _IDENTITY_ORIENTATION
    shared.PlaneOrientationSequence = [orientation]
    nominal = not shared.get("PixelMeasuresSequence")
    if nominal:
        # No usable spacing in the source (RG1: PixelSpacing 0\0). OHIF 3.13 fails on a SEG
        # without PixelMeasures, so state a nominal 1 mm per pixel: the SEG shares the
        # source's grid, and the source itself carries no spacing to measure with.
        measures = Dataset()
        measures.PixelSpacing = [1.0, 1.0]
        shared.PixelMeasuresSequence = [measures]
    for measures in shared.get("PixelMeasuresSequence", []):
        if "SliceThickness" not in measures:
            # highdicom's reader rejects PixelMeasures without it (the standard needs it only
            # with a frame of reference); a projection has no slice, so a nominal value
            measures.SliceThickness = _NOMINAL_SLICE_THICKNESS
    for frame_item in seg.PerFrameFunctionalGroupsSequence:
        position = Dataset()
        position.ImagePositionPatient = _ORIGIN
        frame_item.PlanePositionSequence = [position]
    return nominal

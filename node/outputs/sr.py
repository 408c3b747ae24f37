"""TID 1500 Measurement Report (Comprehensive 3D SR) of the finding, as IHE AI Results expects.

Content tree (PS3.16 TID 1500):
- observation context: the node as a device observer;
- procedure reported: a code from CID 100 (see `PROCEDURE_REPORTED`);
- positive: one planar-ROI group (TID 1410) for the whole finding, whose region is the SEG's
  segment (when a SEG is written) and whose area and probability are the job row's; then
  one planar-ROI group per connected component (largest first, at most `MAX_REGIONS`) whose
  region is the component's outline as a SCOORD polyline on the source image, with that
  component's area and probability. highdicom allows one region reference per group, hence
  the split; without a SEG, the component groups alone carry the finding. The largest
  component's group shares the finding's tracking UID (what OHIF needs to show the SR at all);
  the other components have their own.
- negative: one TID 1501 group with the qualitative evaluation Pneumothorax = Absent.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from model.preprocess import pixel_spacing_of
from node.outputs._common import (
    DISCLAIMER,
    MODEL_NAME,
    PredictionLike,
    algorithm_version,
    check_uid,
    checked_mask,
    device_serial_number,
    series_description,
    software_versions,
    source_header,
)
from node.outputs.options import AlgorithmInfo, OutputOptions
from node.outputs.regions import Region, Side, regions_of, side_of

__all__ = ["PROCEDURE_REPORTED", "ReferencedSeg", "build_sr", "device_uid"]

# CID 100 has no chest radiography code (PixelMed's copy has no XR code at all; "XR Chest AP"
# is refused); "Imaging procedure" is in every version of it.
PROCEDURE_REPORTED = codes.SCT.ImagingProcedure
_AREA = codes.SCT.Area
_PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
_PROBABILITY_UNIT = hd.sr.CodedConcept("{probability}", "UCUM", "probability")
_SQUARE_MM = codes.UCUM.SquareMillimeter
_MAXIMUM = codes.SCT.Maximum
_FINDING_SITE = codes.SCT.Lung
_LATERALITY = {Side.LEFT: codes.SCT.Left, Side.RIGHT: codes.SCT.Right, Side.BOTH: codes.SCT.Bilateral}
# Area from ImagerPixelSpacing is at the detector, not the patient (PS3.3 C.8.11.7.1.4).
_AREA_AT_DETECTOR = hd.sr.CodedConcept(
    "AREA-DETECTOR", "99PTXNODE", "Area at the detector plane (ImagerPixelSpacing)"
)
_AREA_IN_PATIENT = hd.sr.CodedConcept("AREA-PIXELSPACING", "99PTXNODE", "Area from PixelSpacing")
_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


class ReferencedSeg:
    """The SEG the SR points at: its UIDs and the segment holding the finding."""

    def __init__(self, series_instance_uid: str, sop_instance_uid: str, segment_number: int = 1) -> None:
        self.series_instance_uid = check_uid(series_instance_uid, "SEG series_instance_uid")
        self.sop_instance_uid = check_uid(sop_instance_uid, "SEG sop_instance_uid")
        if not isinstance(segment_number, int) or not 0 < segment_number < 65536:
            raise ValueError("Segment number must be a positive integer below 65536.")
        self.segment_number = segment_number


def device_uid() -> str:
    """The node's device observer UID: stable per host, so reports from one worker group."""
    return generate_uid(entropy_srcs=["ptx-node device observer", device_serial_number()])


def _algorithm(algorithm: AlgorithmInfo, options: OutputOptions) -> hd.sr.AlgorithmIdentification:
    if algorithm.untrained:
        parameters = ["checkpoint: none (untrained, random weights)"]
    else:
        parameters = [f"checkpoint sha256: {algorithm.checkpoint_sha256}"]
    if options.diagnostic_disclaimer:
        parameters.append(DISCLAIMER)
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name[:64], version=algorithm_version(algorithm), parameters=parameters,
        family=codes.cid7162.ArtificialIntelligence,
    )


def _finding_sites(side: Side | None) -> list[hd.sr.FindingSite]:
    laterality = None if side is None else _LATERALITY[side]
    return [hd.sr.FindingSite(anatomic_location=_FINDING_SITE, laterality=laterality)]


def _measurements(
    area_mm2: float | None, probability: float, method: hd.sr.CodedConcept | None,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> list[hd.sr.Measurement]:
    measurements = []
    if area_mm2 is not None and method is not None:
        measurements.append(hd.sr.Measurement(
            name=_AREA, value=float(area_mm2), unit=_SQUARE_MM, method=method, algorithm_id=algorithm_id,
        ))
    measurements.append(hd.sr.Measurement(
        name=_PROBABILITY, value=float(probability), unit=_PROBABILITY_UNIT, derivation=_MAXIMUM,
        algorithm_id=algorithm_id,
    ))
    return measurements


def _area_mm2(area_px: int, prediction: PredictionLike) -> float | None:
    """The region's area with the prediction's spacing (the same factor as the job row's)."""
    if prediction.area_mm2 is None or not np.isfinite(prediction.area_mm2) or prediction.area_px <= 0:
        return None
    if area_px == prediction.area_px:
        return float(prediction.area_mm2)
    return float(prediction.area_mm2) * area_px / float(prediction.area_px)


def build_sr(
    source: pydicom.Dataset,
    prediction: PredictionLike,
    *,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    options: OutputOptions,
    seg: ReferencedSeg | None = None,
    regions: Sequence[Region] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The measurement report of one radiograph, in the source's study and its own series.
    `regions`: those of `regions_for` with the same arguments, when the caller has them
    already (None: computed here)."""
    mask = checked_mask(source, prediction.mask, algorithm=algorithm, series_instance_uid=series_instance_uid,
                        sop_instance_uid=sop_instance_uid)
    if seg is not None and not isinstance(seg, ReferencedSeg):
        raise TypeError("seg must be a ReferencedSeg or None.")

    header = source_header(source, options)
    algorithm_id = _algorithm(algorithm, options)
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(), name=MODEL_NAME, manufacturer_name=options.manufacturer,
            model_name=f"{MODEL_NAME} {algorithm.name}"[:64], serial_number=device_serial_number(),
        ),
    )
    if prediction.positive:
        groups = _positive_groups(header, prediction, mask, algorithm_id, seg, regions)
    else:
        groups = [_negative_group(header, algorithm_id)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    evidence = [header]
    if seg is not None and prediction.positive:
        evidence.append(_seg_evidence(header, seg))
    now = datetime.datetime.now()
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=options.sr_series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=options.manufacturer,
        is_complete=False,  # PARTIAL: a machine's findings, not a full report
        is_final=False,
        is_verified=False,  # UNVERIFIED: nobody has signed it
        institution_name=options.institution_name,
        series_description=series_description("SR", algorithm, options),
        series_date=now.date(),
        series_time=now.time(),
    )
    sr.ManufacturerModelName = MODEL_NAME
    sr.SoftwareVersions = software_versions(algorithm)
    sr.DeviceSerialNumber = device_serial_number()
    return sr


def _source_for_region(header: pydicom.Dataset) -> hd.sr.SourceImageForRegion:
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=header.SOPClassUID, referenced_sop_instance_uid=header.SOPInstanceUID
    )


def _positive_groups(
    header: pydicom.Dataset, prediction: PredictionLike, mask: np.ndarray,
    algorithm_id: hd.sr.AlgorithmIdentification, seg: ReferencedSeg | None, regions: Sequence[Region] | None,
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    spacing = pixel_spacing_of(header)  # the one the model measured the area with
    spacing_keyword = spacing[0] if spacing else None
    method = {"PixelSpacing": _AREA_IN_PATIENT, "ImagerPixelSpacing": _AREA_AT_DETECTOR}.get(spacing_keyword or "")
    finding_uid = hd.UID()
    if regions is None:
        regions = regions_of(mask, getattr(prediction, "probability", None), header)
    groups = []
    if seg is not None:
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=finding_uid, identifier="Pneumothorax"),
            referenced_segment=_segmentation_frame(header, seg),
            finding_type=codes.SCT.Pneumothorax,
            finding_sites=_finding_sites(side_of(mask, header)),
            measurements=_measurements(
                _area_mm2(prediction.area_px, prediction), prediction.score, method, algorithm_id
            ),
        ))
    for region in regions:
        # The SEG-frame group has no coordinates; OHIF 3.13 fails the whole viewer ("Something
        # went wrong") on such a group unless an outline group shares its tracking UID, and then
        # draws the finding's numbers on that outline. So the largest region (the finding itself
        # when there is one region) carries the finding's UID; the others have their own.
        # Measured in tests/test_browser.py with one and with two regions.
        same_roi = seg is not None and region is regions[0]
        groups.append(_region_group(header, region, prediction, method, algorithm_id,
                                    tracking_uid=finding_uid if same_roi else hd.UID()))
    return groups


def _region_group(
    header: pydicom.Dataset, region: Region, prediction: PredictionLike, method: hd.sr.CodedConcept | None,
    algorithm_id: hd.sr.AlgorithmIdentification, *, tracking_uid: str,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=f"Pneumothorax region {region.number}"),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=region.outline,
            source_image=_source_for_region(header),
        ),
        finding_type=codes.SCT.Pneumothorax,
        finding_sites=_finding_sites(region.side),
        measurements=_measurements(
            _area_mm2(region.area_px, prediction), region.max_probability, method, algorithm_id
        ),
        geometric_purpose=codes.DCM.Outline,
    )


def _negative_group(
    header: pydicom.Dataset, algorithm_id: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="Pneumothorax"),
        algorithm_id=algorithm_id,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=codes.SCT.Pneumothorax, value=codes.SCT.Absent)],
        source_images=[hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=header.SOPClassUID, referenced_sop_instance_uid=header.SOPInstanceUID,
        )],
    )


def _segmentation_frame(header: pydicom.Dataset, seg: ReferencedSeg) -> hd.sr.ReferencedSegmentationFrame:
    """TID 1410's region as the SEG's frame of the finding's segment (the SEG has one frame
    per segment, so frame number = segment number)."""
    reference = hd.sr.ReferencedSegmentationFrame(
        sop_class_uid=_SEG_SOP_CLASS, sop_instance_uid=seg.sop_instance_uid, frame_number=seg.segment_number,
        segment_number=seg.segment_number,
        source_image=hd.sr.SourceImageForSegmentation(
            referenced_sop_class_uid=header.SOPClassUID, referenced_sop_instance_uid=header.SOPInstanceUID,
        ),
    )
    # PS3.3 C.17.3.2.1 (via C.18.3): with a frame number the segment number "shall not be
    # present" (dciodvfy checks it); the frame identifies the segment
    for item in reference:
        for image in item.get("ReferencedSOPSequence", []):
            if "ReferencedFrameNumber" in image and "ReferencedSegmentNumber" in image:
                del image.ReferencedSegmentNumber
    return reference


def _seg_evidence(header: pydicom.Dataset, seg: ReferencedSeg) -> Dataset:
    item = Dataset()
    item.SOPClassUID = _SEG_SOP_CLASS
    item.SOPInstanceUID = seg.sop_instance_uid
    item.SeriesInstanceUID = seg.series_instance_uid
    item.StudyInstanceUID = header.StudyInstanceUID
    return item

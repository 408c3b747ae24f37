"""TID 1500 SR and GSPS writers on real radiographs and on mutated headers: every object passes
dciodvfy, PixelMed's DicomSRValidator (SR) and dcmpschk (GSPS), and reads back with highdicom
to the prediction it was written from."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from node.outputs import (
    AlgorithmInfo,
    OutputOptions,
    ReferencedSeg,
    build_gsps,
    build_seg,
    build_sr,
)
from node.outputs.regions import MAX_OUTLINE_POINTS, Side, regions_of, side_of
from tests.outputs_helpers import (
    dciodvfy_errors,
    dcmpschk_errors,
    ellipse_mask,
    fill_polylines,
    iou,
    pixelmed_errors,
    pixelmed_sr_reports,
    prediction_for,
    synthetic_cr,
)
from tests.services import deid_file, pydicom_file

TRAINED = AlgorithmInfo(name="unetpp-b4-siim", version="1.2.0", checkpoint_sha256="0f" * 32, untrained=False)
UNTRAINED = AlgorithmInfo(name="unetpp-b4", version="0.0.0", checkpoint_sha256=None, untrained=True)
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")


def _mutated(tmp: Path, name: str) -> pydicom.Dataset:
    """The synthetic CR with one thing real archives do differently."""
    ds = pydicom.dcmread(synthetic_cr(tmp / f"{name}.dcm"))
    if name == "no-orientation":
        del ds.PatientOrientation
    elif name == "imager-spacing-only":
        ds.ImagerPixelSpacing = [0.2, 0.2]
    elif name == "no-body-part-monochrome1-window":
        del ds.BodyPartExamined
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    elif name == "right-first-orientation":
        ds.PatientOrientation = ["R", "F"]  # an AP image flipped: columns run to the patient's right
    return ds


def _sources(tmp: Path) -> dict[str, pydicom.Dataset]:
    return {
        "RG1_UNCR": pydicom.dcmread(pydicom_file("RG1_UNCR.dcm")),
        "RG1_J2KI": pydicom.dcmread(pydicom_file("RG1_J2KI.dcm")),
        "cat": pydicom.dcmread(deid_file("animals/cat.dcm")),
        "synthetic": pydicom.dcmread(synthetic_cr(tmp / "synthetic.dcm")),
        **{name: _mutated(tmp, name) for name in (
            "no-orientation", "imager-spacing-only", "no-body-part-monochrome1-window", "right-first-orientation")},
    }


def _spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    from model import source_image_from_dataset

    return source_image_from_dataset(ds).pixel_spacing_mm


def _two_regions(shape: tuple[int, int]) -> np.ndarray:
    """A large region on the image's left (the patient's right on a PA film) and a small one on its right."""
    return ellipse_mask(shape) | ellipse_mask(shape, center=(0.72, 0.4), axes=(0.05, 0.08), angle=-20)


@dataclass
class Written:
    source: pydicom.Dataset
    prediction: object
    path: Path
    seg: hd.seg.Segmentation | None = None


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Written]:
    """Every object this module checks, written once (PixelMed then runs once for all SRs)."""
    tmp = tmp_path_factory.mktemp("sr-gsps")
    options = OutputOptions()
    out: dict[str, Written] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # real headers ("ward" as a name) make highdicom warn
        for name, source in _sources(tmp).items():
            shape = (int(source.Rows), int(source.Columns))
            spacing = _spacing(source)
            positive = prediction_for(_two_regions(shape), spacing, score=0.93)
            negative = prediction_for(np.zeros(shape, bool), spacing, score=0.21)
            seg = build_seg(source, positive.mask, algorithm=TRAINED, options=options,
                            series_instance_uid=hd.UID(), sop_instance_uid=hd.UID())
            reference = ReferencedSeg(seg.SeriesInstanceUID, seg.SOPInstanceUID)
            objects = {
                f"{name}/sr+seg": (build_sr(source, positive, algorithm=TRAINED, options=options, seg=reference,
                                            series_instance_uid=hd.UID(), sop_instance_uid=hd.UID()), positive, seg),
                f"{name}/sr": (build_sr(source, positive, algorithm=TRAINED, options=options,
                                        series_instance_uid=hd.UID(), sop_instance_uid=hd.UID()), positive, None),
                f"{name}/sr-negative": (build_sr(source, negative, algorithm=UNTRAINED, options=options,
                                                 series_instance_uid=hd.UID(), sop_instance_uid=hd.UID()), negative, None),
                f"{name}/gsps": (build_gsps(source, positive, algorithm=TRAINED, options=options,
                                            series_instance_uid=hd.UID(), sop_instance_uid=hd.UID()), positive, None),
                f"{name}/gsps-negative": (build_gsps(source, negative, algorithm=TRAINED, options=options,
                                                     series_instance_uid=hd.UID(), sop_instance_uid=hd.UID()),
                                          negative, None),
            }
            for key, (dataset, prediction, seg_of) in objects.items():
                path = tmp / (key.replace("/", "_") + ".dcm")
                dataset.save_as(path, enforce_file_format=True)
                out[key] = Written(source, prediction, path, seg_of)
    return out


# PixelMed costs several CPU seconds per SR: it checks one positive (with SEG), one
# negative, and the SEG-less and mutated variants where the content tree differs.
_PIXELMED_CASES = ["RG1_UNCR/sr+seg", "RG1_UNCR/sr-negative", "synthetic/sr",
                   "imager-spacing-only/sr+seg"]


def test_every_sr_and_gsps_passes_the_validators(written: dict[str, Written]) -> None:
    for key, item in written.items():
        errors, output = dciodvfy_errors(item.path)
        assert not errors, f"{key}: dciodvfy errors:\n{output}"
        if "/gsps" in key:
            errors, output = dcmpschk_errors(item.path)
            assert not errors, f"{key}: dcmpschk errors:\n{output}"
    reports = pixelmed_sr_reports([written[key].path for key in _PIXELMED_CASES])
    for key in _PIXELMED_CASES:
        report = reports[written[key].path]
        assert not pixelmed_errors(report), f"{key}: PixelMed DicomSRValidator:\n{report}"


def _groups(path: Path) -> tuple[hd.sr.Comprehensive3DSR, list]:
    sr = hd.sr.srread(path)
    return sr, sr.content.get_planar_roi_measurement_groups()


def _value(group, name) -> float | None:
    found = group.get_measurements(name=name)
    return None if not found else float(found[0].value)


def _texts(item: pydicom.Dataset) -> dict[str, str]:
    """TEXT content items under an SR item, by concept name (TID 4019's algorithm name, version)."""
    return {child.ConceptNameCodeSequence[0].CodeMeaning: child.TextValue
            for child in item.get("ContentSequence", []) if child.ValueType == "TEXT"}


def _laterality(group) -> str | None:
    sites = group.finding_sites
    assert len(sites) == 1 and sites[0].value == codes.SCT.Lung
    laterality = sites[0].laterality
    return None if laterality is None else laterality.meaning


@pytest.mark.parametrize("name", ["RG1_UNCR", "RG1_J2KI", "cat", "synthetic", "imager-spacing-only"])
def test_sr_reads_back_as_the_prediction(name: str, written: dict[str, Written]) -> None:
    item = written[f"{name}/sr+seg"]
    source, prediction = item.source, item.prediction
    sr, groups = _groups(item.path)
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID and sr.SeriesNumber == 9903
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("PARTIAL", "UNVERIFIED", "PRELIMINARY")
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    observer = sr.content.get_observer_contexts(observer_type=codes.cid270.Device)
    assert len(observer) == 1 and observer[0].observer_identifying_attributes.name == "ptx-node"
    assert sr.content[0].ContentTemplateSequence[0].TemplateIdentifier == "1500"

    # the whole finding: the SEG's segment, with the job row's numbers
    finding = groups[0]
    assert finding.reference_type == codes.DCM.ReferencedSegmentationFrame
    assert finding.finding_type == codes.SCT.Pneumothorax
    assert finding.tracking_identifier == "Pneumothorax"
    seg_reference = finding.referenced_segmentation_frame[0].ReferencedSOPSequence[0]
    assert seg_reference.ReferencedSOPInstanceUID == item.seg.SOPInstanceUID
    frame = int(seg_reference.ReferencedFrameNumber)
    frame_groups = item.seg.PerFrameFunctionalGroupsSequence[frame - 1]
    if "SegmentIdentificationSequence" not in frame_groups:  # one segment: in the shared groups
        frame_groups = item.seg.SharedFunctionalGroupsSequence[0]
    segment = frame_groups.SegmentIdentificationSequence[0]
    assert int(segment.ReferencedSegmentNumber) == 1
    assert item.seg.SegmentSequence[0].SegmentLabel == "Pneumothorax"
    assert _value(finding, PROBABILITY) == pytest.approx(prediction.score)
    area = _value(finding, codes.SCT.Area)
    if prediction.area_mm2 is None:
        assert area is None, "no usable spacing, yet an area in mm2"
    else:
        assert area == pytest.approx(prediction.area_mm2)
        measurement = finding.get_measurements(name=codes.SCT.Area)[0]
        assert measurement.unit == codes.UCUM.SquareMillimeter
        # cat.dcm has PixelSpacing; the mutation only ImagerPixelSpacing (its PixelSpacing is 0\\0)
        assert ("ImagerPixelSpacing" in measurement.method.meaning) is (name == "imager-spacing-only")
    algorithm = _texts(finding.get_measurements(name=PROBABILITY)[0][0])
    assert algorithm["Algorithm Name"] == TRAINED.name and TRAINED.short_hash in algorithm["Algorithm Version"]

    # one outline group per component, whose polylines filled are the mask
    regions = groups[1:]
    assert len(regions) == prediction.n_components == 2
    assert all(g.reference_type == codes.DCM.ImageRegion for g in regions)
    assert [g.tracking_identifier for g in regions] == ["Pneumothorax region 1", "Pneumothorax region 2"]
    # the largest region carries the finding's tracking UID (OHIF fails without it), the other its own
    uids = [g.tracking_uid for g in groups]
    assert uids[1] == uids[0] and len(set(uids)) == 2, uids
    polylines = [g.roi.value for g in regions]
    assert all(g.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE for g in regions)
    assert all(np.array_equal(p[0], p[-1]) for p in polylines), "outlines must be closed"
    assert all(len(p) <= MAX_OUTLINE_POINTS + 1 for p in polylines)
    overlap = iou(fill_polylines(polylines, prediction.mask.shape), prediction.mask)
    assert overlap >= 0.95, f"{name}: polylines filled vs mask IoU {overlap:.3f}"
    if area is not None:
        assert sum(_value(g, codes.SCT.Area) for g in regions) == pytest.approx(area)
    # the larger region is on the image's left: the patient's right when columns run to the left
    expected = {"no-orientation": (None, None), "right-first-orientation": ("Left", "Right")}.get(name, ("Right", "Left"))
    assert (_laterality(regions[0]), _laterality(regions[1])) == expected
    assert _laterality(finding) == (None if expected[0] is None else "Bilateral")


def test_one_region_shares_the_findings_tracking_uid(tmp_path: Path) -> None:
    """The SEG's frame and the outline of a one-region finding are one ROI: one tracking UID
    (which is also how OHIF 3.13 puts the finding's numbers on the outline)."""
    source = pydicom.dcmread(synthetic_cr(tmp_path / "cr.dcm"))
    prediction = prediction_for(ellipse_mask((512, 512)), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sr = build_sr(source, prediction, algorithm=TRAINED, options=OutputOptions(),
                      seg=ReferencedSeg(hd.UID(), hd.UID()), series_instance_uid=hd.UID(), sop_instance_uid=hd.UID())
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    finding, region = hd.sr.srread(tmp_path / "sr.dcm").content.get_planar_roi_measurement_groups()
    assert finding.reference_type == codes.DCM.ReferencedSegmentationFrame
    assert region.reference_type == codes.DCM.ImageRegion
    assert finding.tracking_uid == region.tracking_uid


def test_sr_without_seg_carries_the_region_as_polylines(written: dict[str, Written]) -> None:
    item = written["synthetic/sr"]
    _, groups = _groups(item.path)
    assert all(g.reference_type == codes.DCM.ImageRegion for g in groups)
    polylines = [g.roi.value for g in groups]
    assert iou(fill_polylines(polylines, item.prediction.mask.shape), item.prediction.mask) >= 0.95
    assert max(_value(g, PROBABILITY) for g in groups) == pytest.approx(item.prediction.score)
    evidence = item.path.read_bytes()
    assert b"1.2.840.10008.5.1.4.1.1.66.4" not in evidence, "no SEG written, none referenced"


@pytest.mark.parametrize("name", ["RG1_UNCR", "cat", "no-orientation"])
def test_negative_sr_says_absent_and_has_no_region(name: str, written: dict[str, Written]) -> None:
    item = written[f"{name}/sr-negative"]
    sr = hd.sr.srread(item.path)
    assert sr.content.get_planar_roi_measurement_groups() == []
    (group,) = sr.content.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations(name=codes.SCT.Pneumothorax)
    assert evaluation.value == codes.SCT.Absent
    assert "UNTRAINED" in sr.SeriesDescription


@pytest.mark.parametrize("name", ["RG1_UNCR", "cat", "no-body-part-monochrome1-window"])
def test_gsps_outlines_text_window_and_layer(name: str, written: dict[str, Written]) -> None:
    item = written[f"{name}/gsps"]
    pr = pydicom.dcmread(item.path)
    assert pr.Modality == "PR" and pr.StudyInstanceUID == item.source.StudyInstanceUID
    assert pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == \
        item.source.SOPInstanceUID
    (annotation,) = pr.GraphicAnnotationSequence
    polylines = [np.asarray(g.GraphicData, dtype=float).reshape(-1, 2) for g in annotation.GraphicObjectSequence]
    assert all(g.GraphicType == "POLYLINE" and g.GraphicAnnotationUnits == "PIXEL" for g in
               annotation.GraphicObjectSequence)
    assert all(len(p) <= MAX_OUTLINE_POINTS + 1 and np.array_equal(p[0], p[-1]) for p in polylines)
    assert iou(fill_polylines(polylines, item.prediction.mask.shape), item.prediction.mask) >= 0.95
    (text,) = annotation.TextObjectSequence
    assert "NOT FOR DIAGNOSTIC USE" in text.UnformattedTextValue
    assert "Pneumothorax suspected" in text.UnformattedTextValue and "0.93" in text.UnformattedTextValue
    layer = pr.GraphicLayerSequence[0]
    assert layer.GraphicLayer == annotation.GraphicLayer and "GraphicLayerRecommendedDisplayCIELabValue" in layer
    window = pr.SoftcopyVOILUTSequence[0] if "SoftcopyVOILUTSequence" in pr else None
    if item.source.get("WindowCenter") is not None:
        assert window is not None and float(window.WindowCenter) == float(
            np.atleast_1d(item.source.WindowCenter)[0])
    if item.source.PhotometricInterpretation == "MONOCHROME1":
        assert pr.PresentationLUTShape == "INVERSE"


def test_negative_gsps_has_text_only(written: dict[str, Written]) -> None:
    pr = pydicom.dcmread(written["cat/gsps-negative"].path)
    (annotation,) = pr.GraphicAnnotationSequence
    assert "GraphicObjectSequence" not in annotation
    (text,) = annotation.TextObjectSequence
    assert "No pneumothorax detected" in text.UnformattedTextValue


def _distance_to_polyline(points: np.ndarray, polyline: np.ndarray) -> np.ndarray:
    """Each point's distance to the nearest segment of the polyline."""
    start, end = polyline[:-1], polyline[1:]
    direction = end - start
    length2 = np.maximum((direction**2).sum(axis=1), 1e-12)
    t = np.clip(((points[:, None, :] - start[None]) * direction[None]).sum(axis=2) / length2, 0, 1)
    nearest = start[None] + t[..., None] * direction[None]
    return np.sqrt(((points[:, None, :] - nearest) ** 2).sum(axis=2)).min(axis=1)


@pytest.mark.parametrize("seed", range(4))
def test_outlines_stay_within_one_pixel_and_a_few_hundred_points(seed: int) -> None:
    import cv2

    rng = np.random.default_rng(seed)
    # a ragged blob: thresholded smoothed noise, the kind of edge a network gives
    noise = cv2.GaussianBlur(rng.normal(size=(700, 700)).astype(np.float32), (0, 0), 6)
    mask = noise > 0.02
    header = pydicom.Dataset()
    header.PatientOrientation = ["L", "F"]
    regions = regions_of(mask, None, header)
    assert regions and len(regions) <= 100
    assert all(len(region.outline) <= MAX_OUTLINE_POINTS + 1 for region in regions)
    # every outline vertex lies on the mask's boundary, and the boundary within 1 px of its outline
    largest = regions[0]
    _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    sizes = np.bincount(labels.ravel())[1:]
    component = labels == (int(np.argmax(sizes)) + 1)
    contours, _ = cv2.findContours(component.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    boundary = max(contours, key=len).reshape(-1, 2).astype(float) + 0.5
    assert _distance_to_polyline(boundary, largest.outline).max() <= 1.0 + 1e-6
    assert largest.area_px == int(component.sum())


def test_side_follows_patient_orientation() -> None:
    mask = np.zeros((100, 100), bool)
    mask[10:40, 5:30] = True  # image left
    header = pydicom.Dataset()
    for orientation, expected in ((["L", "F"], Side.RIGHT), (["R", "F"], Side.LEFT), (["A", "F"], None),
                                  ("", None)):
        header.PatientOrientation = orientation
        assert side_of(mask, header) is expected, orientation
    header.PatientOrientation = ["L", "F"]
    mask[10:40, 60:95] = True
    assert side_of(mask, header) is Side.BOTH
    del header.PatientOrientation
    assert side_of(mask, header) is None

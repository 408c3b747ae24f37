"""SEG and SC overlay writers: validity (dciodvfy), round trip (highdicom), what a reader sees."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydantic
import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.valuerep import validate_value

from node.outputs import (
    AlgorithmInfo,
    OutputKind,
    OutputOptions,
    OutputPlan,
    build_overlay,
    build_seg,
    outputs_for,
    sanitize_source,
    write_png,
)
from node.outputs.render import BANNER_BACKGROUND, Layout, render_overlay
from tests.outputs_helpers import dciodvfy_errors, ellipse_mask, prediction_for, synthetic_cr
from tests.services import deid_file, pydicom_file

DISCLAIMER = "NOT FOR DIAGNOSTIC USE"
TRAINED = AlgorithmInfo(name="unetpp-b4-siim", version="1.2.0", checkpoint_sha256="0f" * 32, untrained=False)
UNTRAINED = AlgorithmInfo(name="unetpp-b4", version="0.0.0", checkpoint_sha256=None, untrained=True)


@pytest.fixture(autouse=True)
def _quiet_header_warnings():
    # real headers ("ward" as a name, "29" as an age) make pydicom/highdicom warn; that is the point
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _source(name: str, tmp_path: Path) -> Path:
    if name == "synthetic":
        return synthetic_cr(tmp_path / "synthetic_cr.dcm")
    if name == "cat":
        return deid_file("animals/cat.dcm")
    return pydicom_file(name)


def _display_and_spacing(ds: pydicom.Dataset) -> tuple[np.ndarray, tuple[float, float] | None]:
    from model import source_image_from_dataset

    image = source_image_from_dataset(ds)
    return image.pixels, image.pixel_spacing_mm


def _uids() -> dict[str, str]:
    return {"series_instance_uid": hd.UID(), "sop_instance_uid": hd.UID()}


def _assert_valid(path: Path) -> None:
    errors, output = dciodvfy_errors(path)
    assert not errors, f"dciodvfy reports errors for {path.name}:\n{output}"


def _banner_rows(rgb: np.ndarray) -> np.ndarray:
    """Rows whose every pixel is banner red or banner text: the banner strip at the top."""
    red = np.all(rgb == np.asarray(BANNER_BACKGROUND, dtype=np.uint8), axis=2)
    return red.mean(axis=1) > 0.5


# --------------------------------------------------------------------------- options / policy


def test_options_defaults_and_validation() -> None:
    options = OutputOptions()
    assert options.diagnostic_disclaimer is True
    assert options.positive == ("seg", "sr", "gsps", "sc") and options.negative == ("sr", "sc")
    assert (options.seg_series_number, options.sc_series_number) == (9901, 9902)
    assert (options.sr_series_number, options.gsps_series_number) == (9903, 9904)
    assert OutputOptions(negative=["seg", "sc"]).negative == (OutputKind.SEG, OutputKind.SC)
    for bad in ({"fill_opacity": 1.5}, {"outline_color": (0, 0, 300)}, {"unknown_key": 1},
                {"negative": ["pdf"]}, {"positive": ["seg", "seg"]}, {"seg_series_number": 5, "sc_series_number": 5},
                {"sr_series_number": 9904}):
        with pytest.raises(pydantic.ValidationError):
            OutputOptions(**bad)


@pytest.mark.parametrize("old", [{"write_seg": False}, {"write_sc": True}, {"negative_policy": "seg_and_sc"}])
def test_replaced_output_keys_are_refused_naming_the_new_ones(old: dict, tmp_path: Path) -> None:
    from node.config import ConfigError, load_config, write_config_file

    path = write_config_file(tmp_path / "node.toml", {"outputs": old})
    with pytest.raises(ConfigError) as refused:
        load_config(path, environ={})
    message = str(refused.value)
    assert next(iter(old)) in message and "positive = [" in message and "negative = [" in message


def test_algorithm_info_validation() -> None:
    with pytest.raises(ValueError, match="untrained algorithm has no checkpoint_sha256"):
        AlgorithmInfo(name="m", version="1", checkpoint_sha256="0f" * 32, untrained=True)
    with pytest.raises(ValueError, match="needs its checkpoint_sha256"):
        AlgorithmInfo(name="m", version="1", checkpoint_sha256=None, untrained=False)
    with pytest.raises(ValueError, match="64 lower-case hex"):
        AlgorithmInfo(name="m", version="1", checkpoint_sha256="xyz", untrained=False)
    with pytest.raises(ValueError, match="name must be"):
        AlgorithmInfo(name=" ", version="1", checkpoint_sha256=None, untrained=True)


@pytest.mark.parametrize(
    ("positive", "settings", "expected"),
    [
        (True, {}, ("seg", "sr", "gsps", "sc")),
        (False, {}, ("sr", "sc")),
        (True, {"positive": ["sc", "gsps", "seg"]}, ("seg", "gsps", "sc")),  # delivery order, not list order
        (False, {"negative": ["sc", "seg"]}, ("seg", "sc")),
        (False, {"negative": []}, ()),
        (True, {"positive": ["sr"], "negative": ["seg"]}, ("sr",)),
    ],
)
def test_outputs_for_follows_positive_and_negative(positive: bool, settings: dict, expected: tuple) -> None:
    mask = ellipse_mask((64, 64)) if positive else np.zeros((64, 64), bool)
    plan = outputs_for(prediction_for(mask, None), OutputOptions(**settings))
    assert plan == OutputPlan(tuple(OutputKind(k) for k in expected))
    assert plan.seg is ("seg" in expected) and plan.empty is (not expected)


# --------------------------------------------------------------------------- sanitize


def test_sanitize_source_repairs_or_empties_invalid_values(tmp_path: Path) -> None:
    original = pydicom.dcmread(synthetic_cr(tmp_path / "cr.dcm"))
    clean = sanitize_source(original)

    assert clean.PatientAge == "029Y"
    assert clean.StudyDate == "20040826"
    assert clean.StudyTime == "185059"
    assert clean.PatientSex == "M"
    assert len(clean.InstitutionName) == 64
    assert clean.PatientWeight in ("", None)  # "72,5" has no safe reading
    assert float(clean.PatientSize) == pytest.approx(1.75) and len(str(clean.PatientSize)) <= 16
    assert "PixelSpacing" not in clean  # zero spacing means unknown
    assert not any(tag.is_private for tag in clean.keys())
    assert "PixelData" not in clean
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"):
        assert clean[keyword].value == original[keyword].value
    # the source itself is left as it was
    assert original.get_item(0x00101010).value.strip() == b"29"

    # every value in the copy passes pydicom's strict VR validation
    for element in clean.iterall():
        if element.VR == "SQ" or element.value in (None, ""):
            continue
        values = element.value if isinstance(element.value, (list, pydicom.multival.MultiValue)) else [element.value]
        for value in values:
            text_vr = element.VR in ("DS", "IS", "PN")  # validators take their string form
            validate_value(element.VR, str(value) if text_vr else value, pydicom_config.RAISE)


def test_sanitize_source_keeps_pixels_when_asked(tmp_path: Path) -> None:
    ds = pydicom.dcmread(synthetic_cr(tmp_path / "cr.dcm"))
    kept = sanitize_source(ds, keep_pixel_data=True)
    assert np.array_equal(kept.pixel_array, ds.pixel_array)


# --------------------------------------------------------------------------- SEG + SC on real radiographs


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm", "cat", "synthetic"])
def test_seg_and_sc_are_valid_and_round_trip(name: str, tmp_path: Path) -> None:
    source = pydicom.dcmread(_source(name, tmp_path))
    rows, columns = int(source.Rows), int(source.Columns)
    display, spacing = _display_and_spacing(source)
    mask = ellipse_mask((rows, columns))
    prediction = prediction_for(mask, spacing)
    options = OutputOptions()

    seg = build_seg(source, prediction.mask, algorithm=TRAINED, options=options, **_uids())
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    sc, rgb = build_overlay(source, display, prediction, algorithm=TRAINED, options=options, **_uids())
    sc_path = tmp_path / "sc.dcm"
    sc.save_as(sc_path, enforce_file_format=True)
    write_png(rgb, tmp_path / "overlay.png")

    _assert_valid(seg_path)
    _assert_valid(sc_path)

    # SEG: the mask exactly, at source resolution, pointing at the source instance
    read = hd.seg.segread(seg_path)
    assert read.SegmentationType == "BINARY" and read.number_of_segments == 1
    assert read.StudyInstanceUID == source.StudyInstanceUID
    assert read.SeriesInstanceUID != source.SeriesInstanceUID
    assert read.get_source_image_uids() == [
        (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)
    ]
    pixels = read.get_pixels_by_source_instance(
        source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[1]
    )
    assert pixels.shape == (1, rows, columns, 1)
    assert np.array_equal(pixels[0, :, :, 0].astype(bool), mask)
    described = read.SegmentSequence[0]
    assert described.SegmentLabel == "Pneumothorax"
    assert described.SegmentedPropertyTypeCodeSequence[0].CodeValue == "36118008"
    assert described.SegmentAlgorithmType == "AUTOMATIC"
    algorithm = described.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == TRAINED.name
    assert TRAINED.version in algorithm.AlgorithmVersion and TRAINED.short_hash in algorithm.AlgorithmVersion
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    # what OHIF needs: series-level and per-frame references, and a plane it can place
    referenced_series = read.ReferencedSeriesSequence[0]
    assert referenced_series.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced_series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    frame = read.PerFrameFunctionalGroupsSequence[0]
    derivation = frame.DerivationImageSequence[0].SourceImageSequence[0]
    assert derivation.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == [0, 0, 0]
    orientation = read.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    assert [float(v) for v in orientation.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert DISCLAIMER in read.SeriesDescription and "UNTRAINED" not in read.SeriesDescription

    # SC: the same picture, RGB, in the source's study, with the banner on top
    sc_read = pydicom.dcmread(sc_path)
    assert sc_read.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sc_read.StudyInstanceUID == source.StudyInstanceUID
    assert sc_read.PatientID == source.PatientID
    assert sc_read.PhotometricInterpretation == "RGB" and sc_read.SamplesPerPixel == 3
    assert int(sc_read.Columns) == columns and int(sc_read.Rows) > rows  # banner + legend strips
    assert np.array_equal(sc_read.pixel_array, rgb)
    assert sc_read.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    lossy_source = source.get("LossyImageCompression") == "01"
    assert (sc_read.get("LossyImageCompression") == "01") == lossy_source
    assert (read.get("LossyImageCompression") == "01") == lossy_source
    assert DISCLAIMER in sc_read.SeriesDescription and DISCLAIMER in sc_read.ImageComments
    assert "Pneumothorax suspected" in sc_read.ImageComments
    assert _banner_rows(rgb)[:5].all()
    banner_text = rgb[: np.argmin(_banner_rows(rgb))]
    assert (banner_text.min(axis=2) > 200).any(), "no white text in the banner"
    # the radiograph under the banner is the display image, unchanged outside the mask
    top = int(np.argmin(_banner_rows(rgb)))
    image = rgb[top : top + rows]
    gray = (np.clip(display, 0, 1) * 255 + 0.5).astype(np.uint8)
    far = cv2.dilate(mask.astype(np.uint8), np.ones((31, 31), np.uint8)) == 0
    assert np.array_equal(image[far][:, 0], gray[far]) and np.array_equal(image[far][:, 1], gray[far])
    assert (np.abs(image[mask].astype(int) - gray[mask][:, None]).sum(axis=1) > 0).mean() > 0.9


def test_empty_mask_seg_keeps_its_frame(tmp_path: Path) -> None:
    source = pydicom.dcmread(synthetic_cr(tmp_path / "cr.dcm"))
    empty = np.zeros((int(source.Rows), int(source.Columns)), bool)
    seg = build_seg(source, empty, algorithm=TRAINED, options=OutputOptions(negative=["seg", "sc"]), **_uids())
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    _assert_valid(path)
    read = hd.seg.segread(path)
    assert int(read.NumberOfFrames) == 1
    pixels = read.get_pixels_by_source_instance(
        source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[1]
    )
    assert pixels.shape == (1, 512, 512, 1) and not pixels.any()


def test_seg_of_source_with_frame_of_reference_but_no_geometry(tmp_path: Path) -> None:
    source = pydicom.dcmread(synthetic_cr(tmp_path / "cr.dcm"))
    source.FrameOfReferenceUID = hd.UID()  # some DX carry one without orientation/position
    mask = ellipse_mask((512, 512))
    seg = build_seg(source, mask, algorithm=TRAINED, options=OutputOptions(), **_uids())
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    _assert_valid(path)
    pixels = hd.seg.segread(path).get_pixels_by_source_instance(
        source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[1]
    )
    assert np.array_equal(pixels[0, :, :, 0].astype(bool), mask)


def test_untrained_outputs_say_so_even_without_disclaimer(tmp_path: Path) -> None:
    source = pydicom.dcmread(synthetic_cr(tmp_path / "cr.dcm"))
    display, spacing = _display_and_spacing(source)
    prediction = prediction_for(ellipse_mask((512, 512)), spacing)
    options = OutputOptions(diagnostic_disclaimer=False)
    seg = build_seg(source, prediction.mask, algorithm=UNTRAINED, options=options, **_uids())
    sc, rgb = build_overlay(source, display, prediction, algorithm=UNTRAINED, options=options, **_uids())
    assert "UNTRAINED" in seg.SeriesDescription and "UNTRAINED" in sc.SeriesDescription
    seg_algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert "UNTRAINED" in seg_algorithm.AlgorithmVersion
    assert "UNTRAINED" in sc.ImageComments
    assert _banner_rows(rgb)[:5].all(), "the UNTRAINED banner must show with the disclaimer off"
    for dataset in (seg, sc):
        path = tmp_path / f"{dataset.Modality}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        _assert_valid(path)


def test_disclaimer_off_removes_banner_and_text(tmp_path: Path) -> None:
    source = pydicom.dcmread(synthetic_cr(tmp_path / "cr.dcm"))
    display, spacing = _display_and_spacing(source)
    prediction = prediction_for(ellipse_mask((512, 512)), spacing)
    options = OutputOptions(diagnostic_disclaimer=False)
    seg = build_seg(source, prediction.mask, algorithm=TRAINED, options=options, **_uids())
    sc, rgb = build_overlay(source, display, prediction, algorithm=TRAINED, options=options, **_uids())
    for dataset in (seg, sc):
        assert DISCLAIMER not in dataset.SeriesDescription
        assert DISCLAIMER not in dataset.ImageComments
    assert rgb.shape[1] == 512 and rgb.shape[0] > 512  # legend strip only
    assert not _banner_rows(rgb).any()
    top = rgb[:20]
    assert np.array_equal(top[..., 0], top[..., 1]) and np.array_equal(top[..., 1], top[..., 2]), (
        "with the disclaimer off the first rows are the gray radiograph"
    )


def test_negative_overlay_has_no_mask_colours_and_says_so(tmp_path: Path) -> None:
    source = pydicom.dcmread(synthetic_cr(tmp_path / "cr.dcm"))
    del source.BodyPartExamined  # allowed by the node's selection; then Laterality is "unknown"
    display, spacing = _display_and_spacing(source)
    prediction = prediction_for(np.zeros((512, 512), bool), spacing, score=0.12)
    sc, rgb = build_overlay(source, display, prediction, algorithm=TRAINED, options=OutputOptions(), **_uids())
    assert "No pneumothorax detected" in sc.ImageComments and "0.12" in sc.ImageComments
    top = int(np.argmin(_banner_rows(rgb)))
    image = rgb[top : top + 512]
    assert np.array_equal(image[..., 0], image[..., 2]), "a negative draws nothing on the radiograph"
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    _assert_valid(path)


# --------------------------------------------------------------------------- rendering details


def test_text_scales_with_image_size() -> None:
    """Legible at 3 a.m.: on a 2000 px radiograph the banner letters are ~40 px tall."""
    display = np.full((2000, 2000), 0.5, np.float32)
    prediction = prediction_for(ellipse_mask((2000, 2000)), (0.2, 0.2))
    rgb = render_overlay(display, prediction, algorithm=TRAINED, options=OutputOptions())
    banner = rgb[: int(np.argmin(_banner_rows(rgb)))]
    text_rows = np.flatnonzero((banner.min(axis=2) > 200).any(axis=1))
    assert text_rows.size and text_rows[-1] - text_rows[0] >= 30
    small, large = Layout.for_image(512, 512), Layout.for_image(2000, 2000)
    assert large.font_scale > 3 * small.font_scale
    assert large.outline_thickness > small.outline_thickness


def test_legend_text_fits_narrow_images() -> None:
    display = np.full((900, 300), 0.5, np.float32)
    algorithm = AlgorithmInfo(name="a-rather-long-model-name-for-a-narrow-image", version="10.20.30",
                              checkpoint_sha256="ab" * 32, untrained=False)
    rgb = render_overlay(display, prediction_for(ellipse_mask((900, 300)), None), algorithm=algorithm,
                         options=OutputOptions())
    legend = rgb[-80:]
    assert rgb.shape[1] == 300
    # text pixels never touch the right edge: long lines were shrunk to fit
    assert (legend[:, -3:].max(axis=2) < 200).all()


def test_write_png_round_trip(tmp_path: Path) -> None:
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200  # pure red must stay red (not BGR-swapped)
    path = write_png(rgb, tmp_path / "x.png")
    back = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert np.array_equal(back, rgb)
    with pytest.raises(ValueError):
        write_png(rgb[..., 0], tmp_path / "y.png")


def test_inputs_are_checked(tmp_path: Path) -> None:
    source = pydicom.dcmread(synthetic_cr(tmp_path / "cr.dcm"))
    options = OutputOptions()
    with pytest.raises(ValueError, match="does not match the source image"):
        build_seg(source, np.zeros((10, 10), bool), algorithm=TRAINED, options=options, **_uids())
    with pytest.raises(ValueError, match="boolean"):
        build_seg(source, np.zeros((512, 512), np.float32) + 0.5, algorithm=TRAINED, options=options, **_uids())
    with pytest.raises(ValueError, match="valid DICOM UID"):
        build_seg(source, np.zeros((512, 512), bool), algorithm=TRAINED, options=options,
                  series_instance_uid="not-a-uid", sop_instance_uid=hd.UID())
    with pytest.raises(ValueError, match="display must be an array"):
        build_overlay(source, np.zeros((10, 10), np.float32), prediction_for(np.zeros((512, 512), bool), None),
                      algorithm=TRAINED, options=options, **_uids())

"""Helpers for tests/test_outputs.py: a synthetic CR with bad header values, masks, dciodvfy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.services import require_tool

SYNTHETIC_SHAPE = (512, 512)


def _raw(tag: int, vr: str, text: str) -> RawDataElement:
    """An element as a file from a broken archive would hold it (pydicom refuses to build some)."""
    value = text.encode("latin-1")
    if len(value) % 2:
        value += b" "
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def synthetic_cr(path: Path) -> Path:
    """A 512x512 12-bit CR chest phantom whose header carries the invalid values real archives hold.

    PatientAge "29" (SIIM-ACR), dashed StudyDate, colon StudyTime, lower-case sex, a
    65-character institution, comma decimal weight, zero pixel spacing, a private tag.
    """
    rows, columns = SYNTHETIC_SHAPE
    yy, xx = np.mgrid[0:rows, 0:columns]
    image = np.full(SYNTHETIC_SHAPE, 2600, dtype=np.float32)  # soft tissue
    for cx in (0.32, 0.68):  # two dark lungs
        lung = ((xx - cx * columns) / (0.15 * columns)) ** 2 + ((yy - 0.45 * rows) / (0.3 * rows)) ** 2 < 1
        image[lung] = 900
    image[:, int(0.47 * columns) : int(0.53 * columns)] = 3600  # spine
    image += np.random.default_rng(0).normal(0, 40, SYNTHETIC_SHAPE)
    pixels = np.clip(image, 0, 4095).astype(np.uint16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = "SYN-0001"
    ds.PatientBirthDate = "19970101"
    ds.AccessionNumber = "A1"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    bad = {
        0x00101010: ("AS", "29"),  # PatientAge
        0x00080020: ("DA", "2004-08-26"),  # StudyDate
        0x00080030: ("TM", "18:50:59"),  # StudyTime
        0x00100040: ("CS", "m"),  # PatientSex
        0x00080080: ("LO", "Institute of Thoracic Radiology and Pleural Diseases, North Wing 7"),
        0x00101030: ("DS", "72,5"),  # PatientWeight with a decimal comma
        0x00101020: ("DS", "1.7500000000000001"),  # PatientSize: 18 characters
        0x00280030: ("DS", "0\\0"),  # PixelSpacing
        0x00091001: ("LO", "vendor secret"),  # private, no creator
    }
    for tag, (vr, text) in bad.items():
        ds[tag] = _raw(tag, vr, text)
    ds.save_as(path, enforce_file_format=True)
    return path


def ellipse_mask(shape: tuple[int, int], *, center=(0.3, 0.32), axes=(0.09, 0.2), angle=15.0) -> np.ndarray:
    """A hand-drawn stand-in for a pneumothorax: a tilted ellipse in the right upper zone."""
    rows, columns = shape
    mask = np.zeros(shape, dtype=np.uint8)
    cv2.ellipse(
        mask,
        (round(center[0] * columns), round(center[1] * rows)),
        (round(axes[0] * columns), round(axes[1] * rows)),
        angle, 0, 360, 1, -1,
    )
    return mask.astype(bool)


def prediction_for(mask: np.ndarray, pixel_spacing_mm: tuple[float, float] | None, score: float | None = None):
    """The model's real post-processing run on a probability map whose maximum is `score`
    (inside `mask`; for an empty mask, one pixel below the threshold)."""
    from model.postprocess import postprocess

    if score is None:
        score = 0.9 if mask.any() else 0.1

    probability = np.where(mask, np.float32(score), np.float32(0.02))
    if not mask.any():
        probability[0, 0] = score  # a negative's score: below threshold, still the maximum
    prediction = postprocess(probability, pixel_spacing_mm=pixel_spacing_mm)
    assert np.array_equal(prediction.mask, mask)
    return prediction


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    """(lines with "Error", full output) of dciodvfy on `path`; skips/fails when it is missing.
    Read as latin-1: dciodvfy quotes values in the file's own bytes, which need not be UTF-8."""
    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(path)], capture_output=True, timeout=300)
    output = (result.stdout + result.stderr).decode("latin-1")
    return [line for line in output.splitlines() if "Error" in line], output


PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
# current Java refuses PixelMed's stylesheet without these (DESIGN.md)
_XPATH_LIMITS = ["-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0"]
_PIXELMED_BATCH = Path(__file__).parent / "validators" / "PixelMedSRBatch.java"


def pixelmed_sr_reports(paths: list[Path]) -> dict[Path, str]:
    """PixelMed DicomSRValidator's output for each SR, from one JVM (its stylesheets are slow to load)."""
    from tests.services import require_service

    java = require_tool("java")
    require_service(PIXELMED_JAR.exists(), "PixelMed", "apt-get install pixelmed-apps")
    result = subprocess.run(
        [java, *_XPATH_LIMITS, "-cp", str(PIXELMED_JAR), str(_PIXELMED_BATCH), *map(str, paths)],
        capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reports: dict[Path, str] = {}
    for chunk in result.stdout.split("=== ")[1:]:
        name, _, text = chunk.partition("\n")
        reports[Path(name)] = text
    assert set(reports) == set(paths), result.stdout[-4000:]
    return reports


def pixelmed_errors(report: str) -> list[str]:
    """Error lines of a PixelMed SR report, plus a line when the TID 1500 root template was not found."""
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    if "Found Root Template TID_1500" not in report:
        errors.append("PixelMed did not find the TID 1500 root template")
    return errors


def dcmpschk_errors(path: Path) -> tuple[list[str], str]:
    """(error lines, full output) of dcmtk's presentation state checker."""
    tool = require_tool("dcmpschk")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("E:") or "Error" in line]
    if result.returncode != 0 and not errors:
        errors.append(f"dcmpschk exited {result.returncode}")
    return errors, output


def fill_polylines(polylines: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The union of closed polylines in DICOM image coordinates (pixel centre at +0.5), filled."""
    canvas = np.zeros(shape, dtype=np.uint8)
    for points in polylines:
        vertices = np.round(np.asarray(points, dtype=np.float64) - 0.5).astype(np.int32)
        cv2.fillPoly(canvas, [vertices.reshape(-1, 1, 2)], 1)
    return canvas.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union

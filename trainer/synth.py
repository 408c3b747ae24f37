"""Synthetic chest-radiograph phantoms with pneumothorax-like regions of known masks.

Used for tests, demos and learning checks; no patient data. A phantom is a body ellipse,
two darker lungs with vessel-like markings, mediastinum and heart, ribs, clavicles and
noise. A pneumothorax is a crescent at a lung apex or lateral edge that is hyperlucent,
has no lung markings and is bounded by a bright visceral pleural line.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from trainer import rle

__all__ = [
    "CR_IMAGE_STORAGE",
    "PHANTOM_BITS_STORED",
    "Photometric",
    "SynthSummary",
    "make_phantom",
    "write_dicom",
    "write_png_dataset",
    "write_synthetic_dataset",
]

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
PHANTOM_BITS_STORED = 12
_MAX_VALUE = (1 << PHANTOM_BITS_STORED) - 1
_DETECTOR_MM = 430.0  # a 43 cm CR plate


class Photometric(enum.StrEnum):
    MONOCHROME1 = "MONOCHROME1"  # stored inverted: high value = dark
    MONOCHROME2 = "MONOCHROME2"


@dataclass(frozen=True)
class _Lung:
    cx: float
    cy: float
    ax: float
    ay: float
    side: int  # -1 image-left (patient right), +1 image-right (patient left)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    noise = rng.standard_normal((size, size)).astype(np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), sigmaX=max(sigma, 0.3))
    return blurred / (blurred.std() + 1e-6)


def _ellipse_radius(xx: np.ndarray, yy: np.ndarray, lung: _Lung) -> np.ndarray:
    return np.sqrt(((xx - lung.cx) / lung.ax) ** 2 + ((yy - lung.cy) / lung.ay) ** 2)


def _crescent(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, lung: _Lung, where: str
) -> np.ndarray:
    """Crescent between the lung edge and a shrunken edge, tapered along the angle."""
    radius = _ellipse_radius(xx, yy, lung)
    # Angle measured in the ellipse's normalized frame; 0 = lateral, -pi/2 = apex (up).
    angle = np.arctan2((yy - lung.cy) / lung.ay, (xx - lung.cx) / lung.ax * lung.side)
    if where == "apex":
        center, half_width = -np.pi / 2 + rng.uniform(-0.25, 0.35), rng.uniform(0.7, 1.2)
    else:
        center, half_width = rng.uniform(-0.6, 0.2), rng.uniform(0.6, 1.0)
    delta = np.angle(np.exp(1j * (angle - center)))
    taper = np.clip(np.cos(np.clip(delta / half_width, -1, 1) * np.pi / 2), 0, 1) ** 0.7
    thickness = rng.uniform(0.18, 0.42) * taper
    return (radius <= 1.0) & (radius > 1.0 - thickness) & (np.abs(delta) < half_width)


def make_phantom(
    rng: np.random.Generator,
    size: int = 256,
    *,
    positive: bool | None = None,
    positive_fraction: float = 0.4,
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: ``(image uint16 (size, size) 12-bit, bone bright; mask bool)``.

    ``positive`` forces a pneumothorax (True) or none (False); by default one is drawn
    with probability ``positive_fraction``. About 1 in 5 positives has two regions.
    """
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"Phantom size must be an integer >= 32, got {size!r}.")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction!r}.")
    if positive is None:
        positive = bool(rng.random() < positive_fraction)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    xx, yy = np.meshgrid(coords, coords)

    body = (((xx - 0.5) / rng.uniform(0.40, 0.47)) ** 2 + ((yy - 0.58) / 0.62) ** 2) <= 1.0
    body_soft = cv2.GaussianBlur(body.astype(np.float32), (0, 0), sigmaX=size / 80)
    image = 0.06 + 0.50 * body_soft

    gap = rng.uniform(0.035, 0.06)
    lungs = []
    for side in (-1, 1):
        ax = rng.uniform(0.15, 0.19)
        lungs.append(
            _Lung(
                cx=0.5 + side * (gap + ax) + rng.uniform(-0.015, 0.015),
                cy=rng.uniform(0.44, 0.50),
                ax=ax,
                ay=rng.uniform(0.27, 0.33),
                side=side,
            )
        )
    lung_field = np.zeros((size, size), bool)
    for lung in lungs:
        lung_field |= _ellipse_radius(xx, yy, lung) <= 1.0

    mask = np.zeros((size, size), bool)
    if positive:
        count = 2 if rng.random() < 0.2 else 1
        for _ in range(count):
            lung = lungs[int(rng.integers(2))]
            where = "apex" if rng.random() < 0.55 else "lateral"
            mask |= _crescent(rng, xx, yy, lung, where)
        if not mask.any():  # tiny sizes can round a crescent away
            mask |= _crescent(rng, xx, yy, lungs[0], "lateral")
    lung_tissue = lung_field & ~mask

    lung_soft = cv2.GaussianBlur(lung_field.astype(np.float32), (0, 0), sigmaX=size / 200)
    tissue_soft = cv2.GaussianBlur(lung_tissue.astype(np.float32), (0, 0), sigmaX=size / 400)
    image -= rng.uniform(0.26, 0.33) * lung_soft
    # Vessel-like markings: band-passed noise, denser near the hila, absent in the crescent.
    markings = _smooth_noise(rng, size, size / 160) - 0.6 * _smooth_noise(rng, size, size / 40)
    hilum_weight = np.zeros_like(image)
    for lung in lungs:
        radius = _ellipse_radius(xx, yy, lung)
        hilum_weight += np.clip(1.15 - radius, 0, 1)
    image += 0.045 * np.clip(markings, -1.5, 3.0) * hilum_weight * tissue_soft

    pneumo_soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigmaX=size / 300)
    image -= rng.uniform(0.05, 0.09) * pneumo_soft  # more air, more lucent
    if mask.any():
        inner_edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        pleural = inner_edge & lung_field & ~(
            cv2.erode(lung_field.astype(np.uint8), np.ones((3, 3), np.uint8)) == 0
        )
        pleural_soft = cv2.GaussianBlur(pleural.astype(np.float32), (0, 0), sigmaX=size / 400)
        image += 0.12 * pleural_soft / (pleural_soft.max() + 1e-6)

    # Mediastinum (spine and great vessels) and heart, bright soft tissue.
    mediastinum = np.abs(xx - 0.5) < rng.uniform(0.05, 0.07) + 0.06 * np.clip(yy - 0.4, 0, 1)
    mediastinum &= (yy > 0.12) & body
    heart = (((xx - 0.55) / rng.uniform(0.13, 0.17)) ** 2 + ((yy - 0.66) / 0.13) ** 2) <= 1.0
    soft_tissue = cv2.GaussianBlur(
        (mediastinum | heart).astype(np.float32), (0, 0), sigmaX=size / 120
    )
    image += 0.22 * soft_tissue
    # Diaphragm: bright below the lung bases.
    image += 0.12 * np.clip((yy - 0.78) / 0.05, 0, 1) * body_soft

    # Ribs: curved bright bands over each hemithorax; clavicles near the top.
    rib_phase = rng.uniform(0, 2 * np.pi)
    rib_curve = yy - 0.18 * (np.abs(xx - 0.5) - 0.2) ** 2 * 4
    ribs = np.clip(np.sin(rib_curve * 2 * np.pi * rng.uniform(9.0, 11.0) + rib_phase) - 0.55, 0, 1)
    thorax = (np.abs(xx - 0.5) > 0.05) & (yy > 0.14) & (yy < 0.8) & body
    image += 0.11 * ribs * thorax
    clavicle_y = 0.16 + 0.12 * np.abs(xx - 0.5)
    clavicles = np.exp(-(((yy - clavicle_y) / 0.012) ** 2)) * (np.abs(xx - 0.5) < 0.33)
    image += 0.12 * clavicles

    image += 0.012 * rng.standard_normal(image.shape).astype(np.float32)
    image = np.clip(image * rng.uniform(0.9, 1.1) + rng.uniform(-0.03, 0.03), 0.0, 1.0)
    pixels = np.round(image * _MAX_VALUE).astype(np.uint16)
    return pixels, mask


def write_dicom(
    path: str | Path,
    image: np.ndarray,
    *,
    photometric: Photometric | str = Photometric.MONOCHROME2,
    **attrs: Any,
) -> Path:
    """Write a CR chest PA DICOM of ``image`` (uint16, bone bright, 12-bit values).

    ``photometric="MONOCHROME1"`` stores the inverted values, so a reader that honours
    the photometric interpretation sees the same picture. Keyword ``attrs`` override or
    add data elements by keyword (``PatientName="PHANTOM^007"``).
    """
    photometric = Photometric(photometric)
    if image.ndim != 2:
        raise ValueError(f"Image must be 2-D (rows, columns), got shape {image.shape}.")
    if not np.issubdtype(image.dtype, np.integer) or image.min() < 0 or image.max() > _MAX_VALUE:
        raise ValueError(f"Image must hold integers in [0, {_MAX_VALUE}] (12-bit).")
    rows, columns = image.shape
    stored = image.astype(np.uint16)
    if photometric is Photometric.MONOCHROME1:
        stored = (_MAX_VALUE - stored).astype(np.uint16)
    spacing = round(_DETECTOR_MM / max(rows, columns), 6)
    now = dt.datetime.now()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    sop_instance_uid = attrs.get("SOPInstanceUID") or generate_uid()
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "PHANTOM"
    ds.StudyID = "1"
    ds.StudyDescription = "CHEST PA (synthetic phantom)"
    ds.SeriesDescription = "PA"
    ds.ReferringPhysicianName = ""
    ds.PatientName = "PHANTOM^001"
    ds.PatientID = "PHANTOM-001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = "055Y"
    ds.Modality = "CR"
    ds.Manufacturer = "ptx-node synthetic phantom"
    ds.InstitutionName = "ptx-node"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.KVP = 120
    ds.ExposureTime = 10
    ds.XRayTubeCurrent = 200
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric.value
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = 16
    ds.BitsStored = PHANTOM_BITS_STORED
    ds.HighBit = PHANTOM_BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass(frozen=True)
class SynthSummary:
    root: Path
    n_images: int
    n_positive: int
    rle_csv: Path


def write_synthetic_dataset(
    out_dir: str | Path,
    n_images: int,
    *,
    size: int = 256,
    seed: int = 0,
    positive_fraction: float = 0.4,
    mask_png: bool = False,
) -> SynthSummary:
    """Write a SIIM-layout set: ``dicom-images-train/<study>/<series>/<sop>.dcm`` + ``train-rle.csv``.

    Every third image is MONOCHROME1; positives with two regions get two CSV rows.
    ``mask_png`` also writes each known mask as ``masks/<SOPInstanceUID>.png`` (0/255), for
    readers that do not decode RLE (the node's demo scores the SEG it gets back against it).
    """
    if not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}.")
    root = Path(out_dir)
    image_root = root / "dicom-images-train"
    image_root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_positive_target = round(n_images * positive_fraction)
    positives = np.zeros(n_images, bool)
    positives[rng.permutation(n_images)[:n_positive_target]] = True
    masks: dict[str, np.ndarray | list[np.ndarray]] = {}
    for index in range(n_images):
        image, mask = make_phantom(rng, size, positive=bool(positives[index]))
        sop_uid, study_uid, series_uid = generate_uid(), generate_uid(), generate_uid()
        photometric = Photometric.MONOCHROME1 if index % 3 == 2 else Photometric.MONOCHROME2
        write_dicom(
            image_root / study_uid / series_uid / f"{sop_uid}.dcm",
            image,
            photometric=photometric,
            SOPInstanceUID=sop_uid,
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=series_uid,
            PatientName=f"PHANTOM^{index + 1:03d}",
            PatientID=f"PHANTOM-{index + 1:03d}",
        )
        if mask_png:
            (root / "masks").mkdir(exist_ok=True)
            cv2.imwrite(str(root / "masks" / f"{sop_uid}.png"), mask.astype(np.uint8) * 255)
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        parts = [labels == label for label in range(1, count)]
        masks[sop_uid] = parts if len(parts) > 1 else mask
    csv_path = rle.write_rle_csv(root / "train-rle.csv", masks)
    return SynthSummary(root, n_images, int(positives.sum()), csv_path)


def write_png_dataset(
    out_dir: str | Path,
    n_images: int,
    *,
    layout: str = "siim-png",
    size: int = 256,
    seed: int = 0,
    positive_fraction: float = 0.4,
) -> SynthSummary:
    """Phantoms as 8-bit PNGs in the SIIM-ACR PNG copy's layout (``png_images/`` +
    ``png_masks/``, masks 0/255) or PTX-498's (``SiteA..C/N.1.img.png`` + ``N.2.mask.png``).

    PTX-498 holds only positive images, so that layout ignores ``positive_fraction``.
    """
    if layout not in ("siim-png", "ptx498"):
        raise ValueError(f"layout must be 'siim-png' or 'ptx498', got {layout!r}.")
    if not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}.")
    root = Path(out_dir)
    rng = np.random.default_rng(seed)
    positive = np.ones(n_images, bool) if layout == "ptx498" else np.zeros(n_images, bool)
    if layout == "siim-png":
        positive[rng.permutation(n_images)[: round(n_images * positive_fraction)]] = True
    for index in range(n_images):
        image, mask = make_phantom(rng, size, positive=bool(positive[index]))
        pixels = np.round(image.astype(np.float32) * (255.0 / _MAX_VALUE)).astype(np.uint8)
        if layout == "siim-png":
            image_path = root / "png_images" / f"phantom{index:05d}.png"
            mask_path = root / "png_masks" / f"phantom{index:05d}.png"
        else:
            site = root / ("SiteA", "SiteB", "SiteC")[index % 3]
            image_path, mask_path = site / f"{index + 1}.1.img.png", site / f"{index + 1}.2.mask.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(image_path), pixels)
        cv2.imwrite(str(mask_path), mask.astype(np.uint8) * 255)
    return SynthSummary(root, n_images, int(positive.sum()), root)

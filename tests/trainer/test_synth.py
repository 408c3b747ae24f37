"""Synthetic phantoms and the SIIM-layout synthetic dataset."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from trainer import rle, synth


def test_phantom_shapes_and_masks() -> None:
    rng = np.random.default_rng(0)
    image, mask = synth.make_phantom(rng, 128, positive=True)
    assert image.shape == mask.shape == (128, 128)
    assert image.dtype == np.uint16 and image.max() <= 4095
    assert mask.dtype == bool and 20 < mask.sum() < 0.15 * mask.size
    # The crescent is hyperlucent: darker on average than the rest of the image's lungs.
    assert image[mask].mean() < np.median(image)
    _, negative = synth.make_phantom(rng, 128, positive=False)
    assert not negative.any()
    with pytest.raises(ValueError, match="size must be an integer >= 32"):
        synth.make_phantom(rng, 16)


def test_phantom_is_reproducible() -> None:
    first = synth.make_phantom(np.random.default_rng(7), 64)
    second = synth.make_phantom(np.random.default_rng(7), 64)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_write_dicom_is_a_cr_chest_pa(tmp_path: Path, photometric: str) -> None:
    image, _ = synth.make_phantom(np.random.default_rng(1), 64)
    path = synth.write_dicom(
        tmp_path / "x.dcm", image, photometric=photometric, PatientName="PHANTOM^042"
    )
    ds = pydicom.dcmread(path)
    assert ds.Modality == "CR" and ds.BodyPartExamined == "CHEST" and ds.ViewPosition == "PA"
    assert ds.SOPClassUID == synth.CR_IMAGE_STORAGE
    assert str(ds.PatientName) == "PHANTOM^042"
    assert ds.PhotometricInterpretation == photometric
    assert len(ds.PixelSpacing) == 2 and len(ds.ImagerPixelSpacing) == 2
    stored = ds.pixel_array
    expected = 4095 - image if photometric == "MONOCHROME1" else image
    np.testing.assert_array_equal(stored, expected)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_write_dicom_passes_dciodvfy(tmp_path: Path) -> None:
    image, _ = synth.make_phantom(np.random.default_rng(2), 64)
    path = synth.write_dicom(tmp_path / "x.dcm", image, photometric="MONOCHROME1")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
    assert errors == []


def test_synthetic_dataset_layout(tmp_path: Path) -> None:
    summary = synth.write_synthetic_dataset(tmp_path, 10, size=64, seed=3)
    assert summary.n_images == 10 and summary.n_positive == 4
    files = sorted((tmp_path / "dicom-images-train").rglob("*.dcm"))
    assert len(files) == 10
    table = rle.read_rle_csv(summary.rle_csv, shape=(64, 64), encoding="relative")
    assert sorted(table.image_ids) == sorted(f.stem for f in files)
    assert sum(table.is_positive(i) for i in table.image_ids) == 4
    photometrics = {pydicom.dcmread(f).PhotometricInterpretation for f in files}
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}

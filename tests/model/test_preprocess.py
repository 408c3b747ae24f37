"""Pixels in: real radiographs, polarity, compression, geometry round trip."""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from model.preprocess import (
    GeometricTransform,
    PreprocessConfig,
    SourceImage,
    UnsupportedImageError,
    lung_crop_box,
    preprocess,
    source_image_from_dataset,
    source_image_from_png,
)


def _relabel_monochrome2_inverted(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Same pixels, stored inverted and labelled MONOCHROME2 (window moved to match)."""
    out = copy.deepcopy(ds)
    stored = ds.pixel_array
    max_stored = (1 << int(ds.BitsStored)) - 1
    out.PixelData = (max_stored - stored.astype(np.int64)).astype(stored.dtype).tobytes()
    out.PhotometricInterpretation = "MONOCHROME2"
    if "PresentationLUTShape" in out:
        out.PresentationLUTShape = "IDENTITY"
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if "WindowCenter" in ds:
        # stored' = M - stored  =>  value' = K - value with K = slope * M + 2 * intercept;
        # the DICOM linear window is symmetric under that map when center' = K - center + 1.
        k = slope * max_stored + 2 * intercept
        center = float(ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter)
        out.WindowCenter = k - center + 1
    return out


# ----------------------------------------------------------------------------- real files


@pytest.mark.parametrize(
    ("fixture", "shape", "photometric"),
    [
        ("rg1_uncr_path", (1955, 1841), "MONOCHROME1"),
        ("rg1_j2kr_path", (1955, 1841), "MONOCHROME1"),
        ("rg1_j2ki_path", (1955, 1841), "MONOCHROME1"),
        ("cat_path", (2614, 3072), "MONOCHROME2"),
        ("cr_16x16_path", (16, 16), "MONOCHROME1"),
    ],
)
def test_real_radiographs_decode_to_unit_range(request, fixture, shape, photometric) -> None:
    ds = pydicom.dcmread(request.getfixturevalue(fixture))
    image = source_image_from_dataset(ds)
    assert image.pixels.dtype == np.float32
    assert image.shape == shape
    assert image.photometric == photometric
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
    assert image.pixels.std() > 0.02  # an image, not a saturated slab
    for size in (256, 512):
        net, transform = preprocess(image, PreprocessConfig(input_size=size, lung_crop=True))
        assert net.shape == (size, size) and net.dtype == np.float32
        assert np.isfinite(net).all()
        assert transform.source_shape == shape


def test_rg1_is_inverted_so_bone_is_bright(rg1_uncr) -> None:
    # MONOCHROME1: low stored values are white. After decoding, the darkest stored pixels
    # (spine / mediastinum) must come out bright.
    image = source_image_from_dataset(rg1_uncr)
    stored = rg1_uncr.pixel_array
    low = stored <= np.percentile(stored, 5)
    high = stored >= np.percentile(stored, 95)
    assert image.pixels[low].mean() > image.pixels[high].mean() + 0.3


def test_pixel_spacing_from_header(cat, cr_16x16, rg1_uncr) -> None:
    assert source_image_from_dataset(cat).pixel_spacing_mm == (0.14, 0.14)
    assert source_image_from_dataset(cr_16x16).pixel_spacing_mm == (0.1, 0.1)  # ImagerPixelSpacing
    # RG1 carries PixelSpacing 0\0: not a spacing.
    assert source_image_from_dataset(rg1_uncr).pixel_spacing_mm is None


@pytest.mark.parametrize("fixture", ["rg1_uncr", "cr_16x16"])
@pytest.mark.parametrize("drop_window", [False, True])
def test_monochrome1_equals_inverted_monochrome2(request, fixture, drop_window) -> None:
    ds = copy.deepcopy(request.getfixturevalue(fixture))
    if drop_window:  # exercise the robust percentile window too
        del ds.WindowCenter
        del ds.WindowWidth
    relabelled = _relabel_monochrome2_inverted(ds)
    a = source_image_from_dataset(ds)
    b = source_image_from_dataset(relabelled)
    assert a.photometric == "MONOCHROME1" and b.photometric == "MONOCHROME2"
    np.testing.assert_allclose(a.pixels, b.pixels, atol=1e-5)
    cfg = PreprocessConfig(input_size=256, lung_crop=True)
    net_a, _ = preprocess(a, cfg)
    net_b, _ = preprocess(b, cfg)
    # CLAHE works on 8-bit values; allow a rare one-level rounding difference at .5 boundaries.
    assert np.mean(np.abs(net_a - net_b)) < 1e-3


def test_presentation_lut_inverse_on_monochrome2_inverts(cat) -> None:
    inverse = copy.deepcopy(cat)
    inverse.PresentationLUTShape = "INVERSE"
    a = source_image_from_dataset(cat).pixels
    b = source_image_from_dataset(inverse).pixels
    np.testing.assert_allclose(a, 1.0 - b, atol=1e-6)


def test_j2k_lossless_gives_identical_input(rg1_uncr_path, rg1_j2kr_path, rg1_j2ki_path) -> None:
    cfg = PreprocessConfig(input_size=512)
    uncompressed = source_image_from_dataset(pydicom.dcmread(rg1_uncr_path))
    lossless = source_image_from_dataset(pydicom.dcmread(rg1_j2kr_path))
    np.testing.assert_array_equal(uncompressed.pixels, lossless.pixels)
    net_u, _ = preprocess(uncompressed, cfg)
    net_l, _ = preprocess(lossless, cfg)
    np.testing.assert_array_equal(net_u, net_l)
    # The lossy copy is close but not identical.
    lossy = source_image_from_dataset(pydicom.dcmread(rg1_j2ki_path))
    net_i, _ = preprocess(lossy, cfg)
    assert not np.array_equal(net_u, net_i)
    assert np.mean(np.abs(net_u - net_i)) < 0.05


def test_implausible_header_window_falls_back_to_robust_window(cat) -> None:
    broken = copy.deepcopy(cat)
    broken.WindowCenter = 60000  # far above the 12-bit data: everything would be black
    broken.WindowWidth = 10
    good = source_image_from_dataset(cat).pixels
    fallback = source_image_from_dataset(broken).pixels
    inside = np.mean((fallback > 0) & (fallback < 1))
    assert inside > 0.5
    assert np.corrcoef(good.ravel()[::97], fallback.ravel()[::97])[0, 1] > 0.95


def test_voi_lut_sequence_is_used(cr_16x16) -> None:
    from pydicom.dataset import Dataset

    ds = copy.deepcopy(cr_16x16)
    lut = Dataset()
    # 4096-entry identity-like LUT with 12-bit output: first mapped value 0, 16-bit words.
    lut.LUTDescriptor = [4096, 0, 12]
    lut.LUTData = list(range(4095, -1, -1))  # a decreasing LUT: must invert the image
    ds.VOILUTSequence = [lut]
    ds.RescaleSlope = 1
    ds.RescaleIntercept = 0
    with_lut = source_image_from_dataset(ds).pixels
    del ds.VOILUTSequence
    del ds.WindowCenter
    del ds.WindowWidth
    stored = ds.pixel_array.astype(np.float64)
    expected = 1.0 - (1.0 - stored / 4095.0)  # LUT inverts, then MONOCHROME1 inverts back
    assert np.corrcoef(with_lut.ravel(), expected.ravel())[0, 1] > 0.99


def test_unsupported_images_are_refused(cat) -> None:
    from pydicom.data import get_testdata_file

    rgb = pydicom.dcmread(get_testdata_file("SC_rgb.dcm", download=False))
    with pytest.raises(UnsupportedImageError, match="Only grayscale images are supported"):
        source_image_from_dataset(rgb)
    multi = pydicom.dcmread(get_testdata_file("emri_small.dcm", download=False))
    with pytest.raises(UnsupportedImageError, match="Only single-frame images are supported"):
        source_image_from_dataset(multi)
    no_pixels = copy.deepcopy(cat)
    del no_pixels.PixelData
    with pytest.raises(UnsupportedImageError, match="Dataset has no pixel data"):
        source_image_from_dataset(no_pixels)


def test_png_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray8 = rng.integers(0, 256, (300, 280), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "g8.png"), gray8)
    image = source_image_from_png(tmp_path / "g8.png")
    np.testing.assert_allclose(image.pixels, gray8 / 255.0, atol=1e-7)
    assert image.photometric == "PNG" and image.pixel_spacing_mm is None

    cv2.imwrite(str(tmp_path / "rgb_gray.png"), np.dstack([gray8] * 3))
    np.testing.assert_array_equal(source_image_from_png(tmp_path / "rgb_gray.png").pixels, image.pixels)

    colour = np.dstack([gray8, gray8[::-1], gray8])
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    with pytest.raises(UnsupportedImageError, match="is colour"):
        source_image_from_png(tmp_path / "colour.png")

    gray16 = (rng.integers(0, 4096, (64, 64)) * 1).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    image16 = source_image_from_png(tmp_path / "g16.png")
    assert image16.pixels.max() == 1.0 and image16.pixels.min() == 0.0

    with pytest.raises(UnsupportedImageError, match="Could not read PNG"):
        source_image_from_png(tmp_path / "missing.png")


# ----------------------------------------------------------------------------- geometry


def _ellipse_mask(shape: tuple[int, int], center_frac, radii_frac) -> np.ndarray:
    h, w = shape
    mask = np.zeros(shape, np.uint8)
    center = (int(center_frac[1] * w), int(center_frac[0] * h))
    axes = (max(1, int(radii_frac[1] * w)), max(1, int(radii_frac[0] * h)))
    cv2.ellipse(mask, center, axes, 20, 0, 360, 1, thickness=-1)
    return mask.astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


@pytest.mark.parametrize("size", [256, 512, 1024])
@pytest.mark.parametrize("lung_crop", [False, True])
@pytest.mark.parametrize("shape", [(1955, 1841), (2614, 3072), (1024, 1024), (400, 333)])
def test_mask_round_trip_through_geometry(size, lung_crop, shape) -> None:
    cfg = PreprocessConfig(input_size=size, lung_crop=lung_crop)
    # A pneumothorax-sized region in the upper right lung, inside the crop box.
    mask = _ellipse_mask(shape, (0.35, 0.32), (0.14, 0.10))
    _, transform = preprocess(np.zeros(shape, np.float32), cfg)
    net = transform.forward_mask(mask)
    assert net.shape == (size, size) and net.dtype == np.bool_
    back = transform.inverse(net)
    assert back.shape == shape and back.dtype == np.bool_
    assert _iou(mask, back) > 0.98
    # Probability maps take the linear path: same geometry.
    back_prob = transform.inverse(net.astype(np.float32), order="linear")
    assert back_prob.dtype == np.float32
    assert _iou(mask, back_prob >= 0.5) > 0.98
    back_nearest = transform.inverse(net, order="nearest")
    assert _iou(mask, back_nearest) > 0.97


@pytest.mark.parametrize("size", [256, 512, 1024])
def test_round_trip_on_tiny_source(size) -> None:
    # 16x16 CR: upsampled to the network and back.
    mask = np.zeros((16, 16), bool)
    mask[3:9, 4:11] = True
    for lung_crop in (False, True):
        _, transform = preprocess(np.zeros((16, 16), np.float32), PreprocessConfig(input_size=size, lung_crop=lung_crop))
        back = transform.inverse(transform.forward_mask(mask))
        assert _iou(mask, back) > 0.98


def test_lung_crop_box_and_outside_is_zero() -> None:
    cfg = PreprocessConfig(lung_crop=True)
    box = lung_crop_box((1024, 1024), cfg)
    # rows 8%-78% and cols 10%-85% of 1024, plus 20 px padding.
    assert (box.top, box.bottom, box.left, box.right) == (61, 819, 82, 891)
    big = lung_crop_box((2048, 2048), cfg)  # padding scales with the image
    assert (big.top, big.bottom) == (123, 1638)
    _, transform = preprocess(np.zeros((1024, 1024), np.float32), cfg)
    back = transform.inverse(np.ones((512, 512), np.float32))
    assert back[box.top:box.bottom, box.left:box.right].min() > 0.99
    assert back[:box.top].max() == 0 and back[:, box.right:].max() == 0


def test_transform_rejects_wrong_shapes() -> None:
    _, transform = preprocess(np.zeros((100, 120), np.float32), PreprocessConfig(input_size=64))
    assert isinstance(transform, GeometricTransform)
    with pytest.raises(ValueError, match=r"Expected an array of shape \(64, 64\)"):
        transform.inverse(np.zeros((32, 32), np.float32))
    with pytest.raises(ValueError, match="order must be"):
        transform.inverse(np.zeros((64, 64), np.float32), order="cubic")


# ----------------------------------------------------------------------------- normalization


def test_preprocess_normalization_and_clahe() -> None:
    ramp = np.tile(np.linspace(0, 1, 512, dtype=np.float32), (512, 1))
    plain, _ = preprocess(ramp, PreprocessConfig(input_size=512, clahe=False))
    np.testing.assert_allclose(plain, (ramp - 0.449) / 0.226, atol=1e-5)
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.random((512, 512)).astype(np.float32), (0, 0), 4)
    low_contrast = 0.45 + 0.1 * (texture - texture.min()) / np.ptp(texture)
    enhanced, _ = preprocess(low_contrast, PreprocessConfig(input_size=512, clahe=True))
    flat, _ = preprocess(low_contrast, PreprocessConfig(input_size=512, clahe=False))
    assert enhanced.std() > 2 * flat.std()  # CLAHE stretches local contrast


def test_preprocess_is_deterministic(cat) -> None:
    image = source_image_from_dataset(cat)
    again = source_image_from_dataset(cat)
    np.testing.assert_array_equal(image.pixels, again.pixels)
    cfg = PreprocessConfig(input_size=256, lung_crop=True)
    np.testing.assert_array_equal(preprocess(image, cfg)[0], preprocess(again, cfg)[0])


def test_config_validation_and_round_trip() -> None:
    cfg = PreprocessConfig(input_size=256, lung_crop=True, clahe_clip_limit=3.0)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="multiple of 32"):
        PreprocessConfig(input_size=500)
    with pytest.raises(ValueError, match="crop_rows"):
        PreprocessConfig(crop_rows=(0.8, 0.2))
    with pytest.raises(ValueError, match="Unknown preprocessing parameters: gamma"):
        PreprocessConfig.from_dict({**cfg.to_dict(), "gamma": 1.0})
    with pytest.raises(ValueError, match="within"):
        preprocess(np.full((64, 64), 2.0, np.float32), cfg)
    with pytest.raises(TypeError, match="float32"):
        SourceImage(pixels=np.zeros((4, 4)))


def _generated_dicom(stored: np.ndarray, bits_stored: int, *, signed: bool = False, **attrs) -> pydicom.Dataset:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(ds.BitsAllocated, signed)]
    ds.PixelData = stored.astype(dtype).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize("bits_stored", [8, 10, 12, 14, 16])
def test_generated_bit_depths(bits_stored: int) -> None:
    rng = np.random.default_rng(bits_stored)
    top = (1 << bits_stored) - 1
    body = cv2.GaussianBlur(rng.random((301, 257)), (0, 0), 5)
    stored = np.rint(top * (body - body.min()) / np.ptp(body)).astype(np.int64)
    image = source_image_from_dataset(_generated_dicom(stored, bits_stored))
    assert image.shape == (301, 257)
    # No window in the header: robust window, monotonic in the stored values.
    assert np.corrcoef(image.pixels.ravel(), stored.ravel())[0, 1] > 0.97
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0


def test_signed_pixels_with_rescale_and_window() -> None:
    rng = np.random.default_rng(0)
    stored = rng.integers(-1000, 1000, (64, 64))
    ds = _generated_dicom(stored, 12, signed=True, RescaleSlope=2, RescaleIntercept=100,
                          WindowCenter=100, WindowWidth=4001)
    pixels = source_image_from_dataset(ds).pixels
    values = stored * 2.0 + 100
    expected = np.clip((values - 99.5) / 4000 + 0.5, 0, 1)
    np.testing.assert_allclose(pixels, expected, atol=1e-6)

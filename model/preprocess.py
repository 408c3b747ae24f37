"""Radiograph pixels -> normalized network input, with an exactly invertible geometry.

Training (``trainer``) and serving (``node``) both go through :func:`preprocess`, so the
network sees the same pixels in both. No torch here: importing this module is cheap.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from os import PathLike
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np

if TYPE_CHECKING:
    import pydicom

__all__ = [
    "GeometricTransform",
    "PreprocessConfig",
    "SourceImage",
    "UnsupportedImageError",
    "pixel_spacing_of",
    "preprocess",
    "source_image_from_dataset",
    "source_image_from_png",
]

#: Network sizes the seeds train at; other multiples of 32 are accepted too.
SUPPORTED_INPUT_SIZES = (256, 512, 1024)

#: Intensity scalings after CLAHE (PreprocessConfig.scaling).
SCALINGS = ("standardize", "minmax", "unit")

#: Fraction of pixels that must fall strictly inside the header window for it to be trusted.
_MIN_INSIDE_WINDOW_FRACTION = 0.2
#: Symmetric percentiles of the robust window (symmetric so that inversion commutes with it).
_ROBUST_PERCENTILES = (0.5, 99.5)
#: Above this many pixels, window statistics are computed on a fixed strided subsample.
_STATS_MAX_PIXELS = 1 << 20


class UnsupportedImageError(ValueError):
    """The input cannot be turned into one grayscale radiograph."""


@dataclass(frozen=True)
class SourceImage:
    """One display-normalized grayscale radiograph on its original pixel grid.

    ``pixels`` is float32 (H, W) in [0, 1], bone bright (MONOCHROME1 already inverted).
    ``pixel_spacing_mm`` is (row spacing, column spacing) in mm, or None when unknown.
    ``photometric`` is the original PhotometricInterpretation ("PNG" for PNG files).
    ``padding`` marks PixelPaddingValue pixels (outside the exposed area): they are left
    out of windowing, shown black, and never part of a mask. None when there are none.
    """

    pixels: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None = None
    photometric: str = "MONOCHROME2"
    padding: np.ndarray | None = None

    def __post_init__(self) -> None:
        pixels = self.pixels
        if not isinstance(pixels, np.ndarray):
            raise TypeError("SourceImage.pixels must be a numpy array.")
        if pixels.ndim != 2 or min(pixels.shape) < 1:
            raise ValueError(f"SourceImage.pixels must be a non-empty 2D array, got shape {pixels.shape}.")
        if pixels.dtype != np.float32:
            raise TypeError(f"SourceImage.pixels must be float32, got {pixels.dtype}.")
        if self.pixel_spacing_mm is not None:
            spacing = tuple(float(v) for v in self.pixel_spacing_mm)
            if len(spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in spacing):
                raise ValueError(
                    f"SourceImage.pixel_spacing_mm must be two positive numbers, got {self.pixel_spacing_mm!r}."
                )
            object.__setattr__(self, "pixel_spacing_mm", spacing)
        if self.padding is not None:
            padding = np.asarray(self.padding, dtype=bool)
            if padding.shape != pixels.shape:
                raise ValueError(f"SourceImage.padding must have the pixels' shape {pixels.shape}.")
            object.__setattr__(self, "padding", padding if padding.any() else None)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))


# --------------------------------------------------------------------------- DICOM / PNG in


def pixel_spacing_of(ds: pydicom.Dataset) -> tuple[str, tuple[float, float]] | None:
    """The spacing areas are measured with, and the attribute it came from: PixelSpacing,
    else ImagerPixelSpacing (the detector plane), each only when both values are positive."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            spacing = (float(value[0]), float(value[1]))
        except (TypeError, ValueError, IndexError):
            continue
        if all(math.isfinite(v) and v > 0 for v in spacing):
            return keyword, spacing
    return None


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    found = pixel_spacing_of(ds)
    return found[1] if found else None


def _stats_sample(values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """A deterministic subsample for percentile statistics (keeps big images cheap);
    only `valid` pixels (not padding) when given."""
    if valid is not None and not valid.all():
        kept = values[valid]
        if kept.size == 0:
            return values.ravel()[:1]
        step = int(math.ceil(kept.size / _STATS_MAX_PIXELS))
        return kept[::step]
    if values.size <= _STATS_MAX_PIXELS:
        return values
    step = int(math.ceil(math.sqrt(values.size / _STATS_MAX_PIXELS)))
    return values[::step, ::step]


def _robust_window(values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Linear window between symmetric low/high percentiles, clipped to [0, 1]."""
    lo, hi = np.percentile(_stats_sample(values, valid), _ROBUST_PERCENTILES)
    if not hi > lo:
        return np.zeros(values.shape, np.float32)
    out = (values - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _first(value: Any) -> float:
    """WindowCenter/Width may be multi-valued; the first pair is the default one."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _header_window(values: np.ndarray, ds: pydicom.Dataset, valid: np.ndarray | None = None) -> np.ndarray | None:
    """Apply the header window (DICOM PS3.3 C.11.2.1.2); None if absent or implausible."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center = _first(ds.WindowCenter)
        width = _first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if not (math.isfinite(center) and math.isfinite(width)):
        return None
    if function == "SIGMOID":
        if width <= 0:
            return None
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        if width <= 0:
            return None
        out = (values - center) / width + 0.5
    else:
        if width < 1:
            return None
        out = (values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    sample = _stats_sample(out, valid)
    inside = np.count_nonzero((sample > 0.0) & (sample < 1.0)) / sample.size
    # A window from another bit depth or a wrong header saturates almost everything.
    if inside < _MIN_INSIDE_WINDOW_FRACTION:
        return None
    return out


def _voi_lut_sequence(values: np.ndarray, ds: pydicom.Dataset, valid: np.ndarray | None = None) -> np.ndarray | None:
    if "VOILUTSequence" not in ds or len(ds.VOILUTSequence) == 0:
        return None
    from pydicom.pixels import apply_voi

    # LUTs index integer values; modality output is integral unless a fractional rescale applies.
    lut_input = values.astype(np.int64) if np.array_equal(values, np.rint(values)) else values
    try:
        out = apply_voi(lut_input, ds, index=0).astype(np.float64)
    except Exception:  # noqa: BLE001 - a broken LUT falls back to the window, as viewers do
        return None
    inside = out if valid is None or not valid.any() else out[valid]
    lo, hi = float(inside.min()), float(inside.max())
    if not hi > lo:
        return None
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _padding_mask(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """Stored values equal to PixelPaddingValue, or in its range up to PixelPaddingRangeLimit
    (PS3.3 C.7.5.1.1.2); None without a usable PixelPaddingValue."""
    try:
        value = ds.get("PixelPaddingValue")
        limit = ds.get("PixelPaddingRangeLimit")
        if value is None or isinstance(value, (bytes, bytearray)):
            return None
        value = int(_first(value))
        limit = value if limit is None or isinstance(limit, (bytes, bytearray)) else int(_first(limit))
    except (TypeError, ValueError, IndexError):
        return None
    lo, hi = min(value, limit), max(value, limit)
    padding = (stored >= lo) & (stored <= hi)
    return padding if padding.any() and not padding.all() else None


def source_image_from_dataset(ds: pydicom.Dataset) -> SourceImage:
    """Decode one grayscale single-frame radiograph to display-normalized float pixels.

    Order (DICOM grayscale pipeline): modality LUT / rescale, VOI LUT sequence or window
    (robust percentile window when absent or implausible), then polarity: MONOCHROME1 or
    Presentation LUT Shape INVERSE is inverted so that bone is bright.
    """
    from pydicom.pixels import apply_modality_lut

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UnsupportedImageError("Dataset has no pixel data.")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedImageError(
            f"Only grayscale images are supported (MONOCHROME1/MONOCHROME2, 1 sample per pixel); "
            f"got PhotometricInterpretation {photometric or 'missing'!r} with {samples} samples per pixel."
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise UnsupportedImageError(f"Only single-frame images are supported; got {frames} frames.")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure is "cannot decode"
        raise UnsupportedImageError(f"Pixel data could not be decoded: {exc}") from exc
    if stored.ndim != 2:
        raise UnsupportedImageError(f"Expected a 2D pixel array, got shape {stored.shape}.")

    padding = _padding_mask(stored, ds)
    valid = None if padding is None else ~padding
    try:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    except Exception:  # noqa: BLE001 - a broken rescale/LUT: stored values, windowed from their statistics
        values = stored.astype(np.float64)
    if not np.isfinite(values).all():
        values = stored.astype(np.float64)
    pixels = _voi_lut_sequence(values, ds, valid)
    if pixels is None:
        pixels = _header_window(values, ds, valid)
    if pixels is None:
        pixels = _robust_window(values, valid)

    shape = str(ds.get("PresentationLUTShape", "") or "").upper()
    # For MONOCHROME1, INVERSE restates the polarity (PS3.3 C.8.11.6.1.2): invert once, not twice.
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        pixels = 1.0 - pixels
    if padding is not None:
        pixels = np.where(padding, 0.0, pixels)  # outside the exposure: black, whatever the polarity
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    return SourceImage(pixels=pixels, pixel_spacing_mm=_pixel_spacing(ds), photometric=photometric, padding=padding)


def source_image_from_png(path: str | PathLike[str]) -> SourceImage:
    """Read a grayscale PNG (SIIM-ACR PNG copy, PTX-498).

    8-bit PNGs are display images already (value / 255); 16-bit PNGs get the same robust
    percentile window as a DICOM without a usable window.
    """
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise UnsupportedImageError(f"Could not read PNG {str(path)!r}.")
    if data.ndim == 3:
        channels = data[..., :3]  # alpha, if any, carries no image content
        if not (np.array_equal(channels[..., 0], channels[..., 1])
                and np.array_equal(channels[..., 0], channels[..., 2])):
            raise UnsupportedImageError(f"PNG {str(path)!r} is colour; only grayscale images are supported.")
        data = channels[..., 0]
    if data.dtype == np.uint8:
        pixels = data.astype(np.float32) / 255.0
    elif data.dtype == np.uint16:
        pixels = _robust_window(data.astype(np.float64))
    else:
        raise UnsupportedImageError(f"PNG {str(path)!r} has unsupported sample type {data.dtype}.")
    return SourceImage(pixels=np.ascontiguousarray(pixels), pixel_spacing_mm=None, photometric="PNG")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PreprocessConfig:
    """Every parameter that decides what the network sees; stored in checkpoint manifests.

    ``crop_rows``/``crop_cols`` are fractions of the source height/width (the UNet++ seed's
    fixed lung region). ``crop_pad_px`` is counted in pixels of a 1024-pixel image and scaled
    with the source size, so that a 1024 PNG and its 3000-pixel DICOM crop the same anatomy.
    ``scaling`` is the last step: "standardize" ((x - ``mean``) / ``std``, ImageNet gray
    statistics; what checkpoints without the field were trained with), "minmax" (each image
    stretched to [0, 1] by its own minimum and maximum, the UNet++ seed's MinMax after CLAHE)
    or "unit" (the [0, 1] display image as is, the backbone comparison's scaling).
    """

    input_size: int = 512
    clahe: bool = True
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    lung_crop: bool = False
    crop_rows: tuple[float, float] = (0.08, 0.78)
    crop_cols: tuple[float, float] = (0.10, 0.85)
    crop_pad_px: int = 20
    mean: float = 0.449
    std: float = 0.226
    scaling: Literal["standardize", "minmax", "unit"] = "standardize"

    def __post_init__(self) -> None:
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int):
            raise TypeError("PreprocessConfig.input_size must be an integer.")
        if self.input_size < 32 or self.input_size % 32 != 0:
            raise ValueError(
                f"PreprocessConfig.input_size must be a positive multiple of 32, got {self.input_size}."
            )
        if not isinstance(self.clahe, bool) or not isinstance(self.lung_crop, bool):
            raise TypeError("PreprocessConfig.clahe and lung_crop must be booleans.")
        if not (self.clahe_clip_limit > 0):
            raise ValueError("PreprocessConfig.clahe_clip_limit must be positive.")
        if isinstance(self.clahe_tile_grid, bool) or not isinstance(self.clahe_tile_grid, int) or self.clahe_tile_grid < 1:
            raise ValueError("PreprocessConfig.clahe_tile_grid must be a positive integer.")
        for name in ("crop_rows", "crop_cols"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or not (0.0 <= value[0] < value[1] <= 1.0):
                raise ValueError(f"PreprocessConfig.{name} must be (start, stop) with 0 <= start < stop <= 1.")
            object.__setattr__(self, name, value)
        if isinstance(self.crop_pad_px, bool) or not isinstance(self.crop_pad_px, int) or self.crop_pad_px < 0:
            raise ValueError("PreprocessConfig.crop_pad_px must be a non-negative integer.")
        if not (self.std > 0):
            raise ValueError("PreprocessConfig.std must be positive.")
        if self.scaling not in SCALINGS:
            raise ValueError(f"PreprocessConfig.scaling must be one of {', '.join(SCALINGS)}; got {self.scaling!r}.")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["crop_rows"] = list(self.crop_rows)
        data["crop_cols"] = list(self.crop_cols)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown preprocessing parameters: {', '.join(unknown)}.")
        values = dict(data)
        for name in ("crop_rows", "crop_cols"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class CropStep:
    """Keep rows [top, bottom) and columns [left, right) of the incoming array."""

    top: int
    bottom: int
    left: int
    right: int
    kind: Literal["crop"] = "crop"


@dataclass(frozen=True)
class ResizeStep:
    """Resize from ``src_shape`` to ``dst_shape`` (H, W); pixel centres aligned (OpenCV)."""

    src_shape: tuple[int, int]
    dst_shape: tuple[int, int]
    kind: Literal["resize"] = "resize"


def _resize(array: np.ndarray, shape: tuple[int, int], order: str) -> np.ndarray:
    h, w = shape
    if array.shape == (h, w):
        return array.copy()
    if order == "nearest":
        interpolation = cv2.INTER_NEAREST_EXACT
    elif h <= array.shape[0] and w <= array.shape[1]:
        interpolation = cv2.INTER_AREA  # anti-aliased shrink
    else:
        interpolation = cv2.INTER_LINEAR
    return cv2.resize(array, (w, h), interpolation=interpolation)


@dataclass
class GeometricTransform:
    """The geometric steps from the source grid to the network grid, and their inverse."""

    source_shape: tuple[int, int]
    steps: list[CropStep | ResizeStep] = field(default_factory=list)

    @property
    def output_shape(self) -> tuple[int, int]:
        shape = self.source_shape
        for step in self.steps:
            if isinstance(step, CropStep):
                shape = (step.bottom - step.top, step.right - step.left)
            else:
                shape = step.dst_shape
        return shape

    def forward_image(self, image: np.ndarray, order: str = "linear") -> np.ndarray:
        """Map a float source-grid array onto the network grid."""
        _check_order(order)
        if image.shape != self.source_shape:
            raise ValueError(f"Expected an array of shape {self.source_shape}, got {image.shape}.")
        out = np.asarray(image, dtype=np.float32)
        for step in self.steps:
            if isinstance(step, CropStep):
                out = out[step.top:step.bottom, step.left:step.right]
            else:
                out = _resize(np.ascontiguousarray(out), step.dst_shape, order)
        return np.ascontiguousarray(out, dtype=np.float32)

    def forward_mask(self, mask_src: np.ndarray) -> np.ndarray:
        """Map a source-grid mask onto the network grid (bool in -> bool out, float -> float)."""
        if mask_src.dtype == np.bool_ or np.issubdtype(mask_src.dtype, np.integer):
            return self.forward_image(mask_src.astype(np.float32)) >= 0.5
        return self.forward_image(mask_src)

    def inverse(self, array_net: np.ndarray, order: str = "linear") -> np.ndarray:
        """Map a network-grid probability map or mask back onto the exact source grid.

        Pixels outside a crop get 0. Bool input returns bool (resampled linearly, then >= 0.5,
        unless ``order="nearest"``).
        """
        _check_order(order)
        if array_net.shape != self.output_shape:
            raise ValueError(f"Expected an array of shape {self.output_shape}, got {array_net.shape}.")
        is_bool = array_net.dtype == np.bool_
        out = np.asarray(array_net, dtype=np.float32)
        for step, shape_before in zip(reversed(self.steps), reversed(self._shapes_before()), strict=True):
            if isinstance(step, CropStep):
                full = np.zeros(shape_before, np.float32)
                full[step.top:step.bottom, step.left:step.right] = out
                out = full
            else:
                out = _resize(np.ascontiguousarray(out), step.src_shape, order)
        if is_bool:
            return out >= 0.5
        return np.ascontiguousarray(out, dtype=np.float32)

    def _shapes_before(self) -> list[tuple[int, int]]:
        shapes = []
        shape = self.source_shape
        for step in self.steps:
            shapes.append(shape)
            shape = (step.bottom - step.top, step.right - step.left) if isinstance(step, CropStep) else step.dst_shape
        return shapes

    def to_dict(self) -> dict[str, Any]:
        return {"source_shape": list(self.source_shape), "steps": [asdict(s) for s in self.steps]}


def _check_order(order: str) -> None:
    if order not in ("linear", "nearest"):
        raise ValueError(f"order must be 'linear' or 'nearest', got {order!r}.")


def lung_crop_box(shape: tuple[int, int], cfg: PreprocessConfig) -> CropStep:
    """The fixed lung-region crop box on a source grid of ``shape`` (H, W)."""
    h, w = shape
    pad_rows = cfg.crop_pad_px * h / 1024.0
    pad_cols = cfg.crop_pad_px * w / 1024.0
    top = max(0, int(math.floor(cfg.crop_rows[0] * h - pad_rows)))
    bottom = min(h, int(math.ceil(cfg.crop_rows[1] * h + pad_rows)))
    left = max(0, int(math.floor(cfg.crop_cols[0] * w - pad_cols)))
    right = min(w, int(math.ceil(cfg.crop_cols[1] * w + pad_cols)))
    bottom = max(bottom, top + 1)
    right = max(right, left + 1)
    return CropStep(top=top, bottom=bottom, left=left, right=right)


def build_transform(shape: tuple[int, int], cfg: PreprocessConfig) -> GeometricTransform:
    steps: list[CropStep | ResizeStep] = []
    current = (int(shape[0]), int(shape[1]))
    if cfg.lung_crop:
        crop = lung_crop_box(current, cfg)
        steps.append(crop)
        current = (crop.bottom - crop.top, crop.right - crop.left)
    target = (cfg.input_size, cfg.input_size)
    # Always recorded, even when a no-op, so the transform states the network size.
    steps.append(ResizeStep(src_shape=current, dst_shape=target))
    return GeometricTransform(source_shape=(int(shape[0]), int(shape[1])), steps=steps)


# --------------------------------------------------------------------------- preprocess


def _as_unit_pixels(image: SourceImage | np.ndarray) -> np.ndarray:
    if isinstance(image, SourceImage):
        return image.pixels
    if not isinstance(image, np.ndarray):
        raise TypeError(f"preprocess() needs a SourceImage or a numpy array, got {type(image).__name__}.")
    if image.ndim != 2:
        raise ValueError(f"preprocess() needs a 2D image, got shape {image.shape}.")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"preprocess() needs uint8, uint16 or float pixels, got {image.dtype}.")
    pixels = image.astype(np.float32, copy=False)
    if not np.isfinite(pixels).all() or pixels.min() < 0.0 or pixels.max() > 1.0:
        raise ValueError("Float pixels passed to preprocess() must be finite and within [0, 1].")
    return pixels


def apply_clahe(image01: np.ndarray, clip_limit: float, tile_grid: int) -> np.ndarray:
    """CLAHE on the 8-bit image, as the seeds (albumentations) do; returns float in [0, 1]."""
    u8 = np.clip(np.rint(image01 * 255.0), 0, 255).astype(np.uint8)
    clahe = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(tile_grid, tile_grid))
    return clahe.apply(u8).astype(np.float32) / 255.0


def preprocess(
    image: SourceImage | np.ndarray, cfg: PreprocessConfig
) -> tuple[np.ndarray, GeometricTransform]:
    """Source pixels -> float32 (S, S) network input and the transform back to the source grid.

    Steps: [lung crop] -> resize to S x S -> [CLAHE] -> scaling ((x - mean) / std, MinMax or none).
    """
    if not isinstance(cfg, PreprocessConfig):
        raise TypeError("preprocess() needs a PreprocessConfig.")
    pixels = _as_unit_pixels(image)
    transform = build_transform(pixels.shape, cfg)
    net = transform.forward_image(pixels)
    net = np.clip(net, 0.0, 1.0)
    if cfg.clahe:
        net = apply_clahe(net, cfg.clahe_clip_limit, cfg.clahe_tile_grid)
    if cfg.scaling == "standardize":
        net = (net - np.float32(cfg.mean)) / np.float32(cfg.std)
    elif cfg.scaling == "minmax":
        low, high = float(net.min()), float(net.max())
        # a flat image has no range to stretch: it becomes all zeros
        net = (net - low) / (high - low) if high > low else np.zeros_like(net)
    return np.ascontiguousarray(net, dtype=np.float32), transform

"""Probability map at source resolution -> binary mask and image-level findings (no torch)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

import cv2
import numpy as np

__all__ = [
    "PostprocessConfig",
    "PostprocessMode",
    "Prediction",
    "postprocess",
]


class PostprocessMode(StrEnum):
    THRESHOLD = "threshold"  # threshold, then drop components under min_area_px (U-Net paper)
    TRIPLET = "triplet"  # SIIM-ACR winner: top threshold + min area gate, bottom threshold mask


@dataclass(frozen=True)
class PostprocessConfig:
    """Binarization rule. Thresholds compare ``probability > threshold``.

    Areas (``min_area_px``, ``top_min_area_px``) are counted in pixels of the image resized to
    ``area_reference_size`` x ``area_reference_size`` (1024: SIIM-ACR's resolution, where the
    seeds' numbers were tuned), and scaled to the source grid by
    source_pixels / area_reference_size**2, so one setting means the same fraction of the
    image for a 1024 PNG and a 3000-pixel DICOM.
    """

    mode: PostprocessMode | str = PostprocessMode.THRESHOLD
    threshold: float = 0.5
    min_area_px: int = 0
    top_threshold: float = 0.75
    top_min_area_px: int = 600
    bottom_threshold: float = 0.3
    area_reference_size: int = 1024

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", PostprocessMode(self.mode))
        except ValueError:
            valid = ", ".join(m.value for m in PostprocessMode)
            raise ValueError(f"PostprocessConfig.mode must be one of {valid}; got {self.mode!r}.") from None
        for name in ("threshold", "top_threshold", "bottom_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
                raise ValueError(f"PostprocessConfig.{name} must be a number in [0, 1]; got {value!r}.")
        for name in ("min_area_px", "top_min_area_px"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"PostprocessConfig.{name} must be a non-negative integer; got {value!r}.")
        if self.bottom_threshold > self.top_threshold:
            raise ValueError("PostprocessConfig.bottom_threshold must not exceed top_threshold.")
        ref = self.area_reference_size
        if isinstance(ref, bool) or not isinstance(ref, int) or ref < 1:
            raise ValueError("PostprocessConfig.area_reference_size must be a positive integer.")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mode"] = PostprocessMode(self.mode).value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PostprocessConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown post-processing parameters: {', '.join(unknown)}.")
        return cls(**data)

    def scaled_area(self, area_px_at_reference: int, source_shape: tuple[int, int]) -> int:
        """An area given at the reference resolution, in pixels of ``source_shape``."""
        scale = (source_shape[0] * source_shape[1]) / float(self.area_reference_size**2)
        return int(math.ceil(area_px_at_reference * scale))


@dataclass
class Prediction:
    """Model output on the source pixel grid."""

    probability: np.ndarray  # float32 (H, W) in [0, 1]
    mask: np.ndarray  # bool (H, W)
    score: float  # max probability: image-level pneumothorax score
    positive: bool  # mask is not empty
    area_px: int
    area_mm2: float | None
    n_components: int


def _components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected components: (count without background, label image, areas per label)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return count - 1, labels, stats[:, cv2.CC_STAT_AREA]


def _remove_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    if min_area <= 1 or not mask.any():
        return mask
    _, labels, areas = _components(mask)
    keep = areas >= min_area
    keep[0] = False
    return keep[labels]


def postprocess(
    probability_src: np.ndarray,
    cfg: PostprocessConfig | None = None,
    pixel_spacing_mm: tuple[float, float] | None = None,
) -> Prediction:
    """Binarize a source-resolution probability map with ``cfg`` and measure the result."""
    cfg = cfg or PostprocessConfig()
    if not isinstance(probability_src, np.ndarray) or probability_src.ndim != 2:
        raise ValueError("postprocess() needs a 2D probability array.")
    probability = np.clip(probability_src.astype(np.float32, copy=False), 0.0, 1.0)
    shape = (int(probability.shape[0]), int(probability.shape[1]))
    if cfg.mode == PostprocessMode.THRESHOLD:
        mask = _remove_small(probability > cfg.threshold, cfg.scaled_area(cfg.min_area_px, shape))
    else:
        top_area = int(np.count_nonzero(probability > cfg.top_threshold))
        if top_area > 0 and top_area >= cfg.scaled_area(cfg.top_min_area_px, shape):
            mask = probability > cfg.bottom_threshold
        else:
            mask = np.zeros(shape, dtype=bool)
    area_px = int(np.count_nonzero(mask))
    n_components = _components(mask)[0] if area_px else 0
    area_mm2 = None
    if pixel_spacing_mm is not None:
        area_mm2 = float(area_px * float(pixel_spacing_mm[0]) * float(pixel_spacing_mm[1]))
    return Prediction(
        probability=probability,
        mask=mask,
        score=float(probability.max()) if probability.size else 0.0,
        positive=area_px > 0,
        area_px=area_px,
        area_mm2=area_mm2,
        n_components=int(n_components),
    )

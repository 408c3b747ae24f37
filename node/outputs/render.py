"""The overlay picture: the radiograph in gray, the mask outlined and filled, a legend, a banner.

Nothing is drawn over the anatomy but the mask: the banner is a strip added above the
image (an apical pneumothorax lives in the top rows) and the legend a strip below it.
All sizes scale with the image, so the text reads the same on 512 px and 3000 px.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from node.outputs._common import (
    DISCLAIMER,
    FINDING_NEGATIVE,
    FINDING_POSITIVE,
    PredictionLike,
    area_text,
    check_mask,
)
from node.outputs.options import AlgorithmInfo, OutputOptions

__all__ = ["BANNER_BACKGROUND", "Layout", "banner_lines", "render_overlay", "write_png"]

BANNER_BACKGROUND = (150, 0, 0)  # dark red: reads as a warning, white text on it stays legible
_BANNER_TEXT = (255, 255, 255)
_LEGEND_BACKGROUND = (20, 20, 20)
_LEGEND_TEXT = (235, 235, 235)
_NEGATIVE_TEXT = (170, 220, 255)  # light blue: distinct from the amber of a finding
_SEPARATOR = (110, 110, 110)
_HALO = (0, 0, 0)
_FONT = cv2.FONT_HERSHEY_DUPLEX
_TEXT_HEIGHT_FRACTION = 0.022  # of the image's shorter side: ~45 px on a 2000 px radiograph
_MIN_TEXT_HEIGHT = 12


@dataclass(frozen=True)
class Layout:
    """Sizes for one rendering, derived from the image size."""

    font_scale: float
    text_thickness: int
    line_height: int
    margin: int
    outline_thickness: int

    @classmethod
    def for_image(cls, rows: int, columns: int) -> Layout:
        short_side = min(rows, columns)
        text_height = max(_MIN_TEXT_HEIGHT, round(short_side * _TEXT_HEIGHT_FRACTION))
        (_, unit_height), _ = cv2.getTextSize("Hg", _FONT, 1.0, 1)
        font_scale = text_height / unit_height
        return cls(
            font_scale=font_scale,
            text_thickness=max(1, round(font_scale * 1.6)),
            line_height=round(text_height * 1.75),
            margin=max(6, round(text_height * 0.6)),
            outline_thickness=max(2, round(short_side / 450)),
        )


def banner_lines(algorithm: AlgorithmInfo, options: OutputOptions) -> list[str]:
    """The warning strip's lines: the disclaimer unless configured off; UNTRAINED always when so."""
    lines = []
    if options.diagnostic_disclaimer:
        lines.append(DISCLAIMER)
    if algorithm.untrained:
        lines.append("UNTRAINED MODEL - RANDOM OUTPUT")
    if algorithm.caveat:
        lines.append(algorithm.caveat.upper())
    return lines


def render_overlay(
    display: np.ndarray,
    prediction: PredictionLike,
    *,
    algorithm: AlgorithmInfo,
    options: OutputOptions,
) -> np.ndarray:
    """RGB uint8 image: banner strip (if any) + radiograph with mask + legend strip.

    `display` is float (H, W) in [0, 1], already windowed with MONOCHROME1 inverted
    (`model.preprocess.source_image_from_dataset(ds).pixels`).
    """
    gray = _display_to_uint8(display)
    rows, columns = gray.shape
    mask = check_mask(prediction.mask, (rows, columns))
    layout = Layout.for_image(rows, columns)

    image = np.repeat(gray[:, :, None], 3, axis=2)
    _draw_mask(image, mask, layout, options)
    parts = []
    lines = banner_lines(algorithm, options)
    if lines:
        parts.append(_banner(lines, columns, layout))
    parts.append(image)
    parts.append(_legend(prediction, algorithm, options, columns, layout))
    return np.ascontiguousarray(np.concatenate(parts, axis=0))


def write_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an RGB uint8 (H, W, 3) image as PNG; return the path."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError("write_png expects an RGB uint8 array of shape (H, W, 3).")
    path = Path(path)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"Could not write PNG to {path}.")
    return path


def _display_to_uint8(display: np.ndarray) -> np.ndarray:
    if not isinstance(display, np.ndarray) or display.ndim != 2:
        raise ValueError("display must be a 2D (H, W) array.")
    if not np.issubdtype(display.dtype, np.floating):
        raise ValueError("display must be a float array in [0, 1].")
    if not np.isfinite(display).all():
        raise ValueError("display contains NaN or infinite values.")
    return (np.clip(display, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _draw_mask(image: np.ndarray, mask: np.ndarray, layout: Layout, options: OutputOptions) -> None:
    if not mask.any():
        return
    alpha = float(options.fill_opacity)
    mask_u8 = mask.view(np.uint8) if mask.dtype == np.bool_ else mask.astype(np.uint8)
    # Blend the whole image once in OpenCV and copy it in under the mask: several times
    # faster than fancy indexing on a radiograph-sized image.
    solid = np.empty_like(image)
    solid[:] = np.asarray(options.fill_color, dtype=np.uint8)
    blended = cv2.addWeighted(image, 1.0 - alpha, solid, alpha, 0.0)
    cv2.copyTo(blended, mask_u8, image)
    contours, _ = cv2.findContours(mask_u8, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    # a dark halo keeps the outline visible where it crosses bright bone
    cv2.drawContours(image, contours, -1, _HALO, layout.outline_thickness + 2, cv2.LINE_AA)
    cv2.drawContours(image, contours, -1, tuple(options.outline_color), layout.outline_thickness, cv2.LINE_AA)


def _fitted_scale(text: str, width: int, layout: Layout) -> float:
    """The layout's font scale, shrunk if `text` would not fit in `width`."""
    (text_width, _), _ = cv2.getTextSize(text, _FONT, layout.font_scale, layout.text_thickness)
    available = width - 2 * layout.margin
    return layout.font_scale if text_width <= available else layout.font_scale * available / text_width


def _put_text(
    canvas: np.ndarray,
    text: str,
    origin: tuple[int, int],
    color: tuple[int, int, int],
    scale: float,
    layout: Layout,
) -> None:
    thickness = max(1, round(layout.text_thickness * scale / layout.font_scale))
    cv2.putText(canvas, text, origin, _FONT, scale, color, thickness, cv2.LINE_AA)


def _banner(lines: list[str], columns: int, layout: Layout) -> np.ndarray:
    height = layout.line_height * len(lines) + layout.margin
    banner = np.empty((height, columns, 3), dtype=np.uint8)
    banner[:] = BANNER_BACKGROUND
    for index, line in enumerate(lines):
        scale = _fitted_scale(line, columns, layout)
        (text_width, text_height), _ = cv2.getTextSize(line, _FONT, scale, layout.text_thickness)
        x = max(layout.margin, (columns - text_width) // 2)
        y = layout.margin // 2 + layout.line_height * index + (layout.line_height + text_height) // 2
        _put_text(banner, line, (x, y), _BANNER_TEXT, scale, layout)
    return banner


def _legend(
    prediction: PredictionLike,
    algorithm: AlgorithmInfo,
    options: OutputOptions,
    columns: int,
    layout: Layout,
) -> np.ndarray:
    model_line = f"Model: {algorithm.name} {algorithm.version}"
    model_line += " (UNTRAINED)" if algorithm.untrained else f" sha256:{algorithm.short_hash}"
    if prediction.positive:
        finding, finding_color = FINDING_POSITIVE, tuple(options.outline_color)
        lines = [
            f"Max probability: {float(prediction.score):.2f}",
            f"Area: {area_text(prediction)}, {int(prediction.n_components)} region(s)",
        ]
    else:
        finding, finding_color = FINDING_NEGATIVE, _NEGATIVE_TEXT
        lines = [f"Max probability: {float(prediction.score):.2f}"]
    lines.append(model_line)

    height = layout.line_height * (len(lines) + 1) + layout.margin
    legend = np.empty((height, columns, 3), dtype=np.uint8)
    legend[:] = _LEGEND_BACKGROUND
    legend[: max(1, layout.outline_thickness // 2)] = _SEPARATOR  # where the radiograph ends
    (_, text_height), _ = cv2.getTextSize("Hg", _FONT, layout.font_scale, layout.text_thickness)
    baseline_offset = (layout.line_height + text_height) // 2

    x = layout.margin
    if prediction.positive:
        # a swatch in the overlay's colours ties the legend to the drawing
        side = text_height + 2
        top = layout.margin // 2 + (layout.line_height - side) // 2
        swatch = legend[top : top + side, x : x + side]
        alpha = float(options.fill_opacity)
        swatch[:] = (np.asarray(options.fill_color) * alpha + 128.0 * (1.0 - alpha)).astype(np.uint8)
        cv2.rectangle(legend, (x, top), (x + side, top + side), tuple(options.outline_color), layout.outline_thickness)
        x += side + layout.margin
    y = layout.margin // 2 + baseline_offset
    _put_text(legend, finding, (x, y), finding_color, _fitted_scale(finding, columns - x, layout), layout)
    for index, line in enumerate(lines, start=1):
        y = layout.margin // 2 + layout.line_height * index + baseline_offset
        _put_text(legend, line, (layout.margin, y), _LEGEND_TEXT, _fitted_scale(line, columns, layout), layout)
    return legend

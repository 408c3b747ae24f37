"""The finding's regions as the SR and the GSPS describe them: one per connected component,
with its outline as a closed polyline, its area, its maximum probability and its side.

Outlines are in DICOM image coordinates (PS3.3 C.10.5.1.2, C.18.6.1.1): the top left
corner of the top left pixel is (0, 0), so a pixel centre is at (column + 0.5, row + 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import cv2
import numpy as np
import pydicom

from node.outputs._common import PredictionLike, check_mask, check_source, source_header
from node.outputs.options import OutputOptions

__all__ = ["MAX_OUTLINE_POINTS", "MAX_REGIONS", "Region", "Side", "regions_for", "regions_of", "side_of"]

# Viewers and archives choke on SRs with thousands of groups; the SEG holds every region.
MAX_REGIONS = 100
# "A few hundred points" per outline: what a viewer draws without lag.
MAX_OUTLINE_POINTS = 400
# Douglas-Peucker tolerance: the polyline stays within this many pixels of the mask's outline.
OUTLINE_TOLERANCE_PX = 1.0
# A side holds the finding when at least this share of its area lies there.
_ONE_SIDE_SHARE = 0.9


class Side(StrEnum):
    """The patient's side a region lies on, from the image's PatientOrientation."""

    LEFT = "left"
    RIGHT = "right"
    BOTH = "both"


@dataclass(frozen=True)
class Region:
    """One connected component of the mask."""

    number: int  # 1-based, largest first
    area_px: int
    max_probability: float
    outline: np.ndarray  # (N, 2) float: (column, row) in DICOM image coordinates, closed
    side: Side | None  # None when the orientation is unknown


def _column_direction(header: pydicom.Dataset) -> str | None:
    """'L' or 'R': the patient direction of increasing column, or None when not stated."""
    values = header.get("PatientOrientation")
    if values is None or isinstance(values, str) or len(values) != 2:
        return None
    first = str(values[0]).strip().upper()
    if first.startswith("L") or first.startswith("R"):
        return first[0]
    return None


def side_of(mask: np.ndarray, header: pydicom.Dataset, *, column_offset: int = 0,
            image_columns: int | None = None) -> Side | None:
    """Which side of the patient the mask lies on, from its position relative to the
    image's middle column (the patient's midline on a frontal radiograph). `mask` may be a
    crop starting at `column_offset` of an image `image_columns` wide."""
    direction = _column_direction(header)
    total = int(np.count_nonzero(mask))
    if direction is None or total == 0:
        return None
    middle = (mask.shape[1] if image_columns is None else image_columns) / 2.0
    columns = np.nonzero(mask)[1] + column_offset + 0.5
    toward_increasing = float(np.count_nonzero(columns > middle)) / total
    increasing, decreasing = (Side.LEFT, Side.RIGHT) if direction == "L" else (Side.RIGHT, Side.LEFT)
    if toward_increasing >= _ONE_SIDE_SHARE:
        return increasing
    if toward_increasing <= 1.0 - _ONE_SIDE_SHARE:
        return decreasing
    return Side.BOTH


def _outline(component: np.ndarray, offset: tuple[int, int]) -> np.ndarray:
    """The component's outer outline through its boundary pixel centres, simplified."""
    contours, _ = cv2.findContours(component.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=len)
    simplified = cv2.approxPolyDP(contour, OUTLINE_TOLERANCE_PX, True)
    if len(simplified) > MAX_OUTLINE_POINTS:
        # keep the 1 px promise: thin to evenly spaced vertices of the 1 px simplification
        keep = np.linspace(0, len(simplified) - 1, MAX_OUTLINE_POINTS).round().astype(int)
        simplified = simplified[np.unique(keep)]
    points = simplified.reshape(-1, 2).astype(np.float64)
    points += np.asarray([offset[1] + 0.5, offset[0] + 0.5])
    if len(points) < 3:
        # a component one or two pixels wide: its pixels' square, so the polygon has an area
        (x0, y0), (x1, y1) = points.min(axis=0) - 0.5, points.max(axis=0) + 0.5
        points = np.asarray([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    return np.vstack([points, points[:1]])  # closed: last point repeats the first


def regions_of(mask: np.ndarray, probability: np.ndarray | None, header: pydicom.Dataset) -> list[Region]:
    """The mask's 8-connected components (as `model.postprocess` counts them), largest first,
    at most `MAX_REGIONS` of them."""
    if not mask.any():
        return []
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    order = sorted(range(1, count), key=lambda k: -int(stats[k, cv2.CC_STAT_AREA]))[:MAX_REGIONS]
    regions: list[Region] = []
    for number, label in enumerate(order, start=1):
        x, y, w, h = (int(v) for v in stats[label, :4])
        component = labels[y : y + h, x : x + w] == label
        peak = 1.0 if probability is None else float(probability[y : y + h, x : x + w][component].max())
        regions.append(Region(
            number=number,
            area_px=int(stats[label, cv2.CC_STAT_AREA]),
            max_probability=peak,
            outline=_outline(component, (y, x)),
            side=side_of(component, header, column_offset=x, image_columns=mask.shape[1]),
        ))
    return regions


def regions_for(source: pydicom.Dataset, prediction: PredictionLike, options: OutputOptions) -> list[Region]:
    """The regions `build_sr` and `build_gsps` compute from the same arguments (the checked
    mask, the prediction's probability map, the sanitized header): computed once per job, for both."""
    mask = check_mask(prediction.mask, check_source(source))
    return regions_of(mask, getattr(prediction, "probability", None), source_header(source, options))

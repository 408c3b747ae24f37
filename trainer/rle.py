"""SIIM-ACR run-length encoding of pneumothorax masks.

The challenge's encoding is column-major (the reference encoder walks ``mask.T``) and
relative: every start counts from the end of the previous run.  ``-1`` means an empty
mask, and an image may have several CSV rows whose masks are unioned.
"""

from __future__ import annotations

import csv
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "EMPTY_RLE",
    "SIIM_MASK_SHAPE",
    "RleEncoding",
    "RleTable",
    "decode",
    "detect_encoding",
    "encode",
    "read_rle_csv",
    "write_rle_csv",
]

EMPTY_RLE = "-1"
SIIM_MASK_SHAPE = (1024, 1024)


class RleEncoding(enum.StrEnum):
    """How run starts are counted."""

    RELATIVE = "relative"  # stage-1 train-rle.csv: start counted from the end of the previous run
    ABSOLUTE = "absolute"  # plain RLE: start is a pixel index (column-major), 0- or 1-based (absolute_start)
    AUTO = "auto"


def _parse_pairs(rle: str) -> np.ndarray:
    text = rle.strip()
    if text in ("", EMPTY_RLE):
        return np.zeros((0, 2), dtype=np.int64)
    try:
        values = np.array([int(token) for token in text.split()], dtype=np.int64)
    except ValueError as error:
        raise ValueError(f"RLE must be integers separated by spaces, got {rle[:40]!r}.") from error
    if values.size % 2:
        raise ValueError(f"RLE must hold an even number of integers, got {values.size}.")
    pairs = values.reshape(-1, 2)
    if (pairs[:, 1] <= 0).any():
        raise ValueError("RLE run lengths must be positive.")
    return pairs


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"Mask shape must be two positive integers, got {shape!r}.")
    return int(shape[0]), int(shape[1])


def decode(
    rle: str,
    shape: tuple[int, int] = SIIM_MASK_SHAPE,
    *,
    encoding: RleEncoding | str = RleEncoding.RELATIVE,
    absolute_start: int = 0,
) -> np.ndarray:
    """Decode one RLE string into a bool mask of ``shape`` (rows, cols).

    ``absolute_start``: the index of the first pixel in an absolute file, 0 or 1. The stage-2
    file cannot be checked offline (its masks are not public), so this is a setting
    (``ptx-train ... --rle-absolute-start``), 0 by default; relative files ignore it.
    """
    if absolute_start not in (0, 1):
        raise ValueError(f"absolute_start must be 0 or 1, got {absolute_start!r}.")
    height, width = _check_shape(shape)
    encoding = RleEncoding(encoding)
    if encoding is RleEncoding.AUTO:
        raise ValueError("decode() needs a concrete encoding; use detect_encoding() first.")
    pairs = _parse_pairs(rle)
    flat = np.zeros(height * width, dtype=bool)
    position = 0
    for start, length in pairs:
        begin = position + start if encoding is RleEncoding.RELATIVE else start - absolute_start
        if begin < 0 or begin + length > flat.size:
            raise ValueError(
                f"RLE run [{begin}, {begin + length}) falls outside a {height}x{width} mask."
            )
        flat[begin : begin + length] = True
        position = begin + length
    # Column-major: the flat index walks down each column first.
    return flat.reshape(width, height).T


def encode(mask: np.ndarray, *, encoding: RleEncoding | str = RleEncoding.RELATIVE) -> str:
    """Encode a 2-D mask (nonzero = pneumothorax) as the challenge did; empty -> ``"-1"``.

    Same output as the organisers' ``mask2rle(mask.T, ...)`` except one defect: the
    reference drops a run that reaches the very last pixel; we emit it (decoders agree).
    """
    if mask.ndim != 2:
        raise ValueError(f"Mask must be 2-D, got shape {mask.shape}.")
    encoding = RleEncoding(encoding)
    if encoding is RleEncoding.AUTO:
        raise ValueError("encode() needs a concrete encoding, not 'auto'.")
    flat = np.ascontiguousarray(mask.T).reshape(-1) != 0
    if not flat.any():
        return EMPTY_RLE
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    lengths = ends - starts
    if encoding is RleEncoding.RELATIVE:
        previous_ends = np.concatenate([[0], ends[:-1]])
        starts = starts - previous_ends
    return " ".join(f"{start} {length}" for start, length in zip(starts, lengths, strict=True))


def detect_encoding(rles: Iterable[str]) -> RleEncoding:
    """Guess whether a file's RLEs are relative or absolute.

    Absolute runs always ascend without overlap; relative files break that on almost
    every multi-run mask (the second start is a column gap, far below the first).
    """
    multi_run = 0
    for rle in rles:
        pairs = _parse_pairs(rle)
        if len(pairs) < 2:
            continue
        multi_run += 1
        ends = pairs[:-1, 0] + pairs[:-1, 1]
        if (pairs[1:, 0] < ends).any():
            return RleEncoding.RELATIVE
    # With no multi-run mask both readings agree, so relative (the challenge's) is safe.
    return RleEncoding.ABSOLUTE if multi_run else RleEncoding.RELATIVE


@dataclass(frozen=True)
class RleTable:
    """One CSV's annotations: image id -> list of RLE rows (``"-1"`` rows kept)."""

    rows: Mapping[str, tuple[str, ...]]
    encoding: RleEncoding
    shape: tuple[int, int] = SIIM_MASK_SHAPE

    @property
    def image_ids(self) -> list[str]:
        return list(self.rows)

    def is_positive(self, image_id: str) -> bool:
        return any(rle.strip() not in ("", EMPTY_RLE) for rle in self.rows[image_id])

    def mask(self, image_id: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Union of all rows of ``image_id`` as a bool mask."""
        shape = shape or self.shape
        union = np.zeros(shape, dtype=bool)
        for rle in self.rows[image_id]:
            union |= decode(rle, shape, encoding=self.encoding)
        return union


_ID_COLUMNS = ("ImageId", "ImageID", "image_id")
_RLE_COLUMNS = ("EncodedPixels", "encoded_pixels")


def read_rle_csv(
    path: str | Path,
    *,
    encoding: RleEncoding | str = RleEncoding.AUTO,
    shape: tuple[int, int] = SIIM_MASK_SHAPE,
) -> RleTable:
    """Read ``train-rle.csv`` (header ``ImageId, EncodedPixels``) or ``stage_2_train.csv``."""
    path = Path(path)
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            raise ValueError(f"{path} is empty; expected a header 'ImageId,EncodedPixels'.") from None
        id_index = next((header.index(c) for c in _ID_COLUMNS if c in header), None)
        rle_index = next((header.index(c) for c in _RLE_COLUMNS if c in header), None)
        if id_index is None or rle_index is None:
            raise ValueError(f"{path} header {header!r} lacks ImageId and EncodedPixels columns.")
        rows: dict[str, list[str]] = {}
        for line_number, record in enumerate(reader, start=2):
            if not record or all(not cell.strip() for cell in record):
                continue
            if len(record) <= max(id_index, rle_index):
                raise ValueError(f"{path}:{line_number}: expected {len(header)} columns.")
            image_id = record[id_index].strip()
            rows.setdefault(image_id, []).append(record[rle_index].strip() or EMPTY_RLE)
    encoding = RleEncoding(encoding)
    if encoding is RleEncoding.AUTO:
        encoding = detect_encoding(rle for rles in rows.values() for rle in rles)
    table = RleTable({k: tuple(v) for k, v in rows.items()}, encoding, _check_shape(shape))
    for image_id in table.rows:  # fail on a bad row now, not mid-epoch
        for rle in table.rows[image_id]:
            _parse_pairs(rle)
    return table


def write_rle_csv(
    path: str | Path,
    masks: Mapping[str, np.ndarray | list[np.ndarray]],
    *,
    leading_space_header: bool = True,
) -> Path:
    """Write masks in the stage-1 layout; a list of masks becomes several rows."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["ImageId", " EncodedPixels" if leading_space_header else "EncodedPixels"])
        for image_id, value in masks.items():
            parts = value if isinstance(value, list) else [value]
            for part in parts:
                writer.writerow([image_id, " " + encode(part)])
    return path

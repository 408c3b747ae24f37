"""An instance the SCP received as a file (pynetdicom's chunked receive), read without
loading its pixel data (``node.durable.move_durably`` then moves it into the spool).

Intake needs from the data set only header attributes (UIDs, modality, view, size,
photometric interpretation, patient ID for the salted hash) and a SHA-256 of the
Pixel Data value: the header is read with large values deferred and the hash is
streamed from the file, so memory stays bounded whatever the image size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

__all__ = ["ReceivedInstance", "pixel_data_sha256", "read_received"]

_PIXEL_DATA = 0x7FE00010
_DEFER_BYTES = 64 * 1024
_CHUNK = 1 << 20
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class ReceivedInstance:
    path: Path
    dataset: Dataset  # header; values over 64 KB are read from ``path`` on access
    pixel_sha256: str


def _hash_range(path: Path, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = length
        while left > 0:
            chunk = fh.read(min(_CHUNK, left))
            if not chunk:
                raise EOFError(f"file ends {left} bytes before the end of its pixel data")
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def pixel_data_sha256(ds: Dataset) -> str:
    """The job's pixel hash: sha256 of the Pixel Data value as stored (empty when absent)."""
    pixel_data = ds.get(_PIXEL_DATA)
    return hashlib.sha256(pixel_data.value if pixel_data is not None and pixel_data.value else b"").hexdigest()


def read_received(path: Path) -> ReceivedInstance:
    """Header and pixel hash of a received DICOM file (the same hash intake computes
    from a decoded data set). Raises what pydicom raises on a file it cannot read."""
    meta = read_file_meta_info(path)
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        # Offsets in a deflated file are not file offsets: read it whole (a rare syntax).
        ds = pydicom.dcmread(path)
        return ReceivedInstance(path, ds, pixel_data_sha256(ds))
    ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    if _PIXEL_DATA not in ds:
        return ReceivedInstance(path, ds, pixel_data_sha256(ds))
    raw = ds.get_item(_PIXEL_DATA, keep_deferred=True)  # the element header, not its value
    value = getattr(raw, "value", None)
    length = getattr(raw, "length", 0)
    if value is None and length and length != _UNDEFINED_LENGTH:
        return ReceivedInstance(path, ds, _hash_range(path, raw.value_tell, length))
    # Small or encapsulated pixel data was read with the header.
    return ReceivedInstance(path, ds, pixel_data_sha256(ds))

"""Files that survive a crash: the one durable write for the spool and every output."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset, FileMetaDataset

__all__ = ["move_durably", "write_durably"]

_CHUNK = 1 << 20


def write_durably(ds: Dataset, path: Path, *, file_meta: FileMetaDataset | None = None,
                  encoded: bytes | None = None) -> None:
    """Write a DICOM file so it survives a crash: temp name, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(path) as fh:
        if encoded is not None:
            fh.write(encoded)  # the sender's bytes as received: no re-encoding
        else:
            ds = Dataset(ds)
            if file_meta is not None:
                ds.file_meta = file_meta
            ds.save_as(fh, enforce_file_format=True)
    _fsync_path(path.parent)


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[BinaryIO]:
    """A temporary file beside ``path``: fsynced and renamed over ``path`` when the block
    ends, removed if it raises (a crash leaves a ``.incoming-*`` file that gc clears)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_durably(source: Path, path: Path) -> None:
    """Put a file already on disk (a received instance) at ``path`` so it survives a crash:
    a rename when both are on one filesystem, else a streamed copy to a temporary name;
    fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(source, path)
    except OSError:
        with _replacing(path) as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, _CHUNK)
    else:
        _fsync_path(path)
    _fsync_path(path.parent)

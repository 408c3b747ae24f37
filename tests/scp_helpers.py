"""The node's SCP in-process on a free port, a real SQLite job database, and synthetic
chest radiographs written as DICOM files, for the listener tests (TLS, disk, intake)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from node.config import NodeConfig, load_config
from node.db import Association, Job, get_sessionmaker, migrate
from node.scp import StoreSCP
from tests.services import require_tool

__all__ = ["associations", "chest_file", "jobs", "node_config", "running_scp", "storescu"]


def chest_file(folder: Path, *, size: int = 512, seed: int = 0, modality: str = "CR") -> Path:
    """A frontal chest CR the node selects (size x size, 16-bit), as a DICOM file."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientID = f"TLS-{seed}"
    ds.PatientName = "Test^Phantom"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"chest-{seed}-{size}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def node_config(tmp_path: Path, **sections: Any) -> NodeConfig:
    """An embedded-mode config on tmp_path with a migrated database; ``sections`` override."""
    overrides: dict[str, Any] = {
        "spool_dir": str(tmp_path / "spool"),
        "database_url": f"sqlite:///{tmp_path / 'jobs.sqlite'}",
        "scp": {"port": 0, "bind_address": "127.0.0.1"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(overrides.get(key), dict):
            overrides[key] = {**overrides[key], **value}
        else:
            overrides[key] = value
    config = load_config(None, environ={}, overrides=overrides)
    migrate(config.database_url)
    return config


@contextlib.contextmanager
def running_scp(config: NodeConfig) -> Iterator[StoreSCP]:
    scp = StoreSCP(config, enqueuer=None)
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


def storescu(port: int, files: list[Path], *extra: str, calling_ae: str = "STORESCU",
             called_ae: str = "PTXNODE") -> subprocess.CompletedProcess[str]:
    binary = require_tool("storescu")
    return subprocess.run([binary, "-aet", calling_ae, "-aec", called_ae, *extra, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=120)


def jobs(config: NodeConfig) -> list[Job]:
    with get_sessionmaker(config.database_url)() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def associations(config: NodeConfig) -> list[Association]:
    with get_sessionmaker(config.database_url)() as session:
        return list(session.scalars(select(Association).order_by(Association.id)))

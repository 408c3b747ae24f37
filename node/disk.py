"""Free space on the spool's filesystem, and the watermark below which intake stops.

Checked before an instance is written: C-STORE then answers 0xA700 and STOW-RS 503
with Retry-After, so the sender keeps the image and retries, instead of the node
failing half-way through a write. In the embedded default the SQLite job database
usually shares the spool's disk; intake then stops ``database_reserve_mb`` earlier,
so the database can still record jobs finishing, failing and skipping.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from node.config import NodeConfig
from node.db import sqlite_file

__all__ = ["SpoolFullError", "SpoolSpace", "check_spool_space", "spool_space"]

_MB = 1 << 20


class SpoolFullError(OSError):
    """The spool's filesystem is below the free-space watermark; nothing was written."""


@dataclass(frozen=True)
class SpoolSpace:
    free_bytes: int
    total_bytes: int
    # The watermark in bytes: the larger of the size and percentage thresholds, plus the
    # database reserve when the SQLite database is on this filesystem.
    min_free_bytes: int
    database_reserve_bytes: int

    @property
    def free_percent(self) -> float:
        return 100.0 * self.free_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def low(self) -> bool:
        return self.free_bytes < self.min_free_bytes

    def describe(self) -> str:
        reserve = (f" (including {self.database_reserve_bytes / _MB:.0f} MB kept for the job database)"
                   if self.database_reserve_bytes else "")
        return (f"spool filesystem has {self.free_bytes / _MB:.0f} MB free ({self.free_percent:.1f}%), "
                f"intake needs {self.min_free_bytes / _MB:.0f} MB{reserve}")


def existing_parent(path: Path) -> Path:
    """`path` itself if it exists, else its nearest existing parent."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def spool_space(config: NodeConfig) -> SpoolSpace:
    """One statvfs call: cheap enough to run before every instance."""
    spool = existing_parent(config.spool_dir)
    usage = shutil.disk_usage(spool)
    disk = config.disk
    threshold = max(disk.min_free_mb * _MB, disk.min_free_percent / 100.0 * usage.total)
    reserve = 0
    database = sqlite_file(config.database_url)
    if database is not None and os.stat(existing_parent(database)).st_dev == os.stat(spool).st_dev:
        reserve = int(disk.database_reserve_mb * _MB)
    return SpoolSpace(free_bytes=usage.free, total_bytes=usage.total, min_free_bytes=int(threshold) + reserve,
                      database_reserve_bytes=reserve)


def check_spool_space(config: NodeConfig) -> None:
    """Raise ``SpoolFullError`` (an ``OSError``: the sender must retry) below the watermark."""
    space = spool_space(config)
    if space.low:
        raise SpoolFullError(f"{space.describe()}: intake paused until space is freed")

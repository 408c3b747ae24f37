"""Retention: what `ptx-node gc` deletes, and `serve` on a schedule (``[retention]``).

- Spooled inputs and output folders of jobs finished (DONE, SKIPPED, FAILED) more
  than ``files_days`` ago; the rows stay, so the job history outlives the pixels. A
  FAILED job's instance re-sent later is spooled again (see ``node.intake``).
- Spool files that no job row names (a crash between the file and the row), as old.
- Rows of jobs finished more than ``job_rows_days`` ago, their deliveries and their
  files, and association-log rows as old.
- Temporary files: ``.incoming-*`` (durable writes), ``.stow-*`` (STOW-RS bodies) and
  pynetdicom's receive files in ``spool/receiving``; at the start of `serve` every one
  where only the node writes (nothing of its own is in flight yet), otherwise those
  older than ``temp_files_s`` (a worker elsewhere may be writing outputs).

Only jobs in a terminal status are touched: nothing in flight loses its files.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import delete, func, select

from node.config import NodeConfig
from node.db import TERMINAL_STATUSES, Association, Delivery, Job, get_sessionmaker, utcnow
from node.periodic import PeriodicThread

__all__ = ["GcReport", "RetentionThread", "collect_garbage", "remove_leftover_temporaries"]

log = logging.getLogger(__name__)

_TEMP_PREFIXES = (".incoming-", ".stow-")
# Only the node process writes here, so at start everything temporary in them is a leftover.
_NODE_ONLY_FOLDERS = ("incoming", "upload", "receiving")
_BATCH = 500


@dataclasses.dataclass
class GcReport:
    dry_run: bool
    temp_files: list[Path] = dataclasses.field(default_factory=list)
    spool_files: list[Path] = dataclasses.field(default_factory=list)
    output_dirs: list[Path] = dataclasses.field(default_factory=list)
    orphan_files: list[Path] = dataclasses.field(default_factory=list)
    job_rows: int = 0
    association_rows: int = 0
    bytes_freed: int = 0
    _seen: set[Path] = dataclasses.field(default_factory=set, repr=False)

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (f"gc {verb}: {len(self.spool_files)} spooled input(s), {len(self.output_dirs)} output folder(s), "
                f"{len(self.orphan_files)} unreferenced spool file(s), {len(self.temp_files)} temporary file(s), "
                f"{self.job_rows} job row(s), {self.association_rows} association row(s); "
                f"{self.bytes_freed / (1 << 20):.1f} MB")

    def as_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        data.pop("_seen")
        for key in ("temp_files", "spool_files", "output_dirs", "orphan_files"):
            data[key] = [str(p) for p in data[key]]
        return data


def _size(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def _remove(path: Path, report: GcReport, bucket: list[Path]) -> None:
    if path in report._seen or not path.exists():
        return
    report._seen.add(path)
    report.bytes_freed += _size(path)
    bucket.append(path)
    if report.dry_run:
        return
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("gc: cannot delete %s: %s", path, exc)


def _is_temporary(path: Path, spool_dir: Path) -> bool:
    if path.name.startswith(_TEMP_PREFIXES):
        return True
    return path.parent == spool_dir / "receiving"


def _temporaries(config: NodeConfig, *, at_start: bool, now: float) -> Iterator[Path]:
    spool = config.spool_dir
    if not spool.exists():
        return
    max_age = config.retention.temp_files_s
    for path in spool.rglob("*"):
        if not path.is_file() or not _is_temporary(path, spool):
            continue
        node_only = path.parent.parent == spool and path.parent.name in _NODE_ONLY_FOLDERS
        try:
            old = now - path.stat().st_mtime > max_age
        except FileNotFoundError:
            continue
        if old or (at_start and node_only):
            yield path


def remove_leftover_temporaries(config: NodeConfig, *, dry_run: bool = False) -> GcReport:
    """What `serve` runs before it listens: leftovers of a crash."""
    report = GcReport(dry_run=dry_run)
    for path in list(_temporaries(config, at_start=True, now=time.time())):
        _remove(path, report, report.temp_files)
    if report.temp_files:
        log.info("%s", report.summary())
    return report


def _finished_before(cutoff: dt.datetime):  # noqa: ANN202 (a SQL expression)
    return (Job.status.in_(sorted(TERMINAL_STATUSES))
            & (func.coalesce(Job.delivered_at, Job.finished_at, Job.updated_at) < cutoff))


def _job_files(job_rows: list, report: GcReport) -> None:
    for spool_path, output_dir in job_rows:
        if spool_path:
            _remove(Path(spool_path), report, report.spool_files)
        if output_dir:
            _remove(Path(output_dir), report, report.output_dirs)


def _orphans(config: NodeConfig, cutoff_ts: float, report: GcReport) -> None:
    incoming = config.spool_dir / "incoming"
    if not incoming.exists():
        return
    candidates = [p for p in incoming.glob("*.dcm") if not p.name.startswith(_TEMP_PREFIXES)
                  and p.stat().st_mtime < cutoff_ts]
    factory = get_sessionmaker(config.database_url)
    for start in range(0, len(candidates), _BATCH):
        batch = candidates[start:start + _BATCH]
        with factory() as session:
            named = set(session.scalars(select(Job.spool_path).where(Job.spool_path.in_([str(p) for p in batch]))))
        for path in batch:
            if str(path) not in named:
                _remove(path, report, report.orphan_files)


def collect_garbage(config: NodeConfig, *, dry_run: bool = False, now: dt.datetime | None = None) -> GcReport:
    """One retention pass; with ``dry_run`` only reports what it would delete."""
    now = now or utcnow()
    retention = config.retention
    report = GcReport(dry_run=dry_run)
    factory = get_sessionmaker(config.database_url)
    for path in list(_temporaries(config, at_start=False, now=time.time())):
        _remove(path, report, report.temp_files)

    if retention.files_days is not None:
        cutoff = now - dt.timedelta(days=retention.files_days)
        with factory() as session:
            rows = session.execute(select(Job.spool_path, Job.output_dir).where(_finished_before(cutoff))).all()
        _job_files(rows, report)
        _orphans(config, (cutoff - dt.datetime(1970, 1, 1)).total_seconds(), report)

    if retention.job_rows_days is not None:
        cutoff = now - dt.timedelta(days=retention.job_rows_days)
        with factory() as session:
            doomed = session.execute(select(Job.id, Job.spool_path, Job.output_dir)
                                     .where(_finished_before(cutoff))).all()
            _job_files([(r.spool_path, r.output_dir) for r in doomed], report)
            report.job_rows = len(doomed)
            report.association_rows = int(session.scalar(
                select(func.count()).select_from(Association).where(Association.started_at < cutoff)) or 0)
            if not dry_run:
                ids = [r.id for r in doomed]
                for start in range(0, len(ids), _BATCH):
                    batch = ids[start:start + _BATCH]
                    session.execute(delete(Delivery).where(Delivery.job_id.in_(batch)))
                    session.execute(delete(Job).where(Job.id.in_(batch)))
                session.execute(delete(Association).where(Association.started_at < cutoff))
                session.commit()
    return report


class RetentionThread(PeriodicThread):
    """`serve`'s schedule: one `collect_garbage` pass at start, then every ``retention.interval_s``."""

    def __init__(self, config: NodeConfig) -> None:
        super().__init__("retention", config.retention.interval_s, lambda: _collect_and_log(config),
                         run_first=True, join_s=30)


def _collect_and_log(config: NodeConfig) -> None:
    log.info("%s", collect_garbage(config).summary())

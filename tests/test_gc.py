"""Retention: `ptx-node gc [--dry-run]` on a spool with old, new and temporary files, and
the same pass on a schedule inside `serve`, which also clears crash leftovers at start."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
from sqlalchemy import func, select, update

from node.config import NodeConfig, write_config_file
from node.db import Association, Delivery, Job, JobStatus, get_engine, get_sessionmaker, utcnow
from node.demo.pacs import wait_until
from node.gc import collect_garbage
from node.intake import accept_instance
from tests.scp_helpers import chest_file, node_config
from tests.services import NodeProcess, base_node_config

DAY = dt.timedelta(days=1)


def _age(path: Path, seconds: float) -> Path:
    past = time.time() - seconds
    os.utime(path, (past, past))
    return path


def _job(config: NodeConfig, folder: Path, seed: int, status: JobStatus, finished_days_ago: float | None,
         *, outputs: bool = True) -> Job:
    ds = pydicom.dcmread(chest_file(folder, seed=seed))
    job_id = accept_instance(ds, file_meta=ds.file_meta, config=config).job_id
    values: dict[str, object] = {"status": status}
    if finished_days_ago is not None:
        finished = utcnow() - finished_days_ago * DAY
        values |= {"finished_at": finished, "updated_at": finished, "received_at": finished}
    if outputs:
        out = config.spool_dir / "outputs" / f"{job_id:08d}"
        out.mkdir(parents=True)
        (out / "seg.dcm").write_bytes(b"x" * 1000)
        (out / "overlay.png").write_bytes(b"y" * 500)
        values["output_dir"] = str(out)
    with get_engine(config.database_url).begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(**values))
        if status == JobStatus.DONE:
            conn.execute(Delivery.__table__.insert().values(job_id=job_id, destination="pacs", object_kind="SEG",
                                                            status="DELIVERED", attempts=1, instances_sent=1))
    with get_sessionmaker(config.database_url)() as session:
        return session.get(Job, job_id)


def _files(config: NodeConfig) -> set[Path]:
    return {p for p in config.spool_dir.rglob("*") if p.is_file()}


def _count(config: NodeConfig, table: type) -> int:
    with get_sessionmaker(config.database_url)() as session:
        return int(session.scalar(select(func.count()).select_from(table)))


def test_gc_on_a_spool_with_old_new_and_temporary_files(tmp_path: Path) -> None:
    config = node_config(tmp_path, retention={"files_days": 30.0, "job_rows_days": 365.0, "temp_files_s": 3600.0})
    images = tmp_path / "images"
    old_done = _job(config, images, 1, JobStatus.DONE, 40)
    new_done = _job(config, images, 2, JobStatus.DONE, 1)
    old_failed = _job(config, images, 3, JobStatus.FAILED, 40, outputs=False)
    in_flight = _job(config, images, 4, JobStatus.RUNNING, None)  # received long ago, still running
    with get_engine(config.database_url).begin() as conn:
        conn.execute(update(Job).where(Job.id == in_flight.id).values(received_at=utcnow() - 50 * DAY,
                                                                      updated_at=utcnow() - 50 * DAY))
    ancient = _job(config, images, 5, JobStatus.DONE, 400)
    spool = config.spool_dir
    (spool / "upload").mkdir()
    old_temps = []
    for path in (spool / "incoming" / ".incoming-crash1.dcm", spool / "upload" / ".stow-crash.part"):
        path.write_bytes(b"t" * 100)
        old_temps.append(_age(path, 7200))
    writing_now = spool / "outputs" / f"{new_done.id:08d}" / ".incoming-writing.dcm"
    writing_now.write_bytes(b"w")
    old_orphan = spool / "incoming" / "1.2.3.999.abcdef012345.dcm"  # a crash between file and row
    old_orphan.write_bytes(b"o" * 10)
    _age(old_orphan, 40 * 86400)
    new_orphan = spool / "incoming" / "1.2.3.998.abcdef012345.dcm"
    new_orphan.write_bytes(b"n")
    with get_sessionmaker(config.database_url)() as session:
        session.add_all([Association(protocol="dimse", accepted=True, started_at=utcnow() - 400 * DAY),
                         Association(protocol="dimse", accepted=True, started_at=utcnow() - DAY)])
        session.commit()

    expected_spool = {Path(old_done.spool_path), Path(old_failed.spool_path), Path(ancient.spool_path)}
    expected_outputs = {Path(old_done.output_dir), Path(ancient.output_dir)}
    before = _files(config)

    dry = collect_garbage(config, dry_run=True)
    assert set(dry.spool_files) == expected_spool
    assert set(dry.output_dirs) == expected_outputs
    assert set(dry.temp_files) == set(old_temps)
    assert dry.orphan_files == [old_orphan]
    assert dry.job_rows == 1 and dry.association_rows == 1 and dry.bytes_freed > 0
    assert _files(config) == before and _count(config, Job) == 5 and _count(config, Association) == 2

    config_path = write_config_file(tmp_path / "node.toml", {
        "spool_dir": str(spool), "database_url": config.database_url,
        "retention": {"files_days": 30.0, "job_rows_days": 365.0, "temp_files_s": 3600.0}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTX_NODE_")}
    run = subprocess.run([sys.executable, "-m", "node.cli", "gc", "-c", str(config_path), "--json"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["dry_run"] is False and report["job_rows"] == 1
    assert {Path(p) for p in report["spool_files"]} == expected_spool

    after = _files(config)
    gone = before - after
    assert gone == expected_spool | set(old_temps) | {old_orphan} | {
        p for d in expected_outputs for p in before if d in p.parents}
    # Kept: the recent job's files, the running job's input, a temp file being written, a new orphan.
    assert Path(new_done.spool_path) in after and Path(in_flight.spool_path) in after
    assert writing_now in after and new_orphan in after and (spool / "patient-id.salt") in after
    with get_sessionmaker(config.database_url)() as session:
        assert session.get(Job, ancient.id) is None
        assert session.get(Job, old_done.id).status == JobStatus.DONE  # the row outlives its files
        assert not list(session.scalars(select(Delivery).where(Delivery.job_id == ancient.id)))
    assert _count(config, Association) == 1
    assert collect_garbage(config).summary().startswith("gc deleted: 0 spooled input(s), 0 output folder(s)")


def test_serve_clears_crash_leftovers_at_start_and_runs_gc_on_its_schedule(tmp_path: Path) -> None:
    config = base_node_config(tmp_path, worker={"embedded_workers": 0},
                              retention={"files_days": 1.0, "interval_s": 1.0})
    spool = Path(config["spool_dir"])
    node = NodeProcess(tmp_path, config)
    # An old finished job to find on the schedule, made with the node's own intake.
    staged = node_config(tmp_path, spool_dir=str(spool), database_url=config["database_url"])
    old = _job(staged, tmp_path / "images", 1, JobStatus.DONE, 3)
    fresh_leftovers = [spool / "incoming" / ".incoming-abc.dcm", spool / "receiving" / "tmpabc.dcm",
                       spool / "upload" / ".stow-abc.part"]
    for path in fresh_leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"crash")
    worker_writing = spool / "outputs" / "00000099" / ".incoming-seg.dcm"
    worker_writing.parent.mkdir(parents=True)
    worker_writing.write_bytes(b"in progress elsewhere")
    node.start()
    try:
        assert not any(p.exists() for p in fresh_leftovers)
        wait_until(lambda: not Path(old.spool_path).exists() and not Path(old.output_dir).exists(), 60,
                   what="the scheduled retention pass to delete the old job's files")
        assert worker_writing.exists()
        assert "gc deleted:" in node.log_text()
    finally:
        node.stop()

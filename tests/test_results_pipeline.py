"""The worker writes the objects `[outputs] positive/negative` name, fixes their UIDs on the
job row first, and delivers them SEG, SR, GSPS, SC; `ptx-node resend` sends them all again.
In-process (real SQLite migrated with Alembic, a real C-STORE receiver), with checkpoints
that force the result (tests/forced_checkpoint.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import inspect

from node.config import load_config, write_config_file
from node.db import Job, JobStatus, get_engine, get_sessionmaker, migrate
from node.demo.receiver import FolderReceiver
from node.intake import IntakeOutcome, accept_instance
from tests.forced_checkpoint import forced_checkpoint
from tests.services import make_phantom

pytestmark = [pytest.mark.slow]

SOP_CLASS_KIND = {
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",
    "1.2.840.10008.5.1.4.1.1.11.1": "gsps",
    "1.2.840.10008.5.1.4.1.1.7": "sc",
}
UID_COLUMNS = [f"{kind}_{level}_instance_uid" for kind in ("seg", "sr", "gsps", "sc") for level in ("series", "sop")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    base = tmp_path_factory.mktemp("forced")
    return {positive: forced_checkpoint(base / str(positive), positive=positive) for positive in (True, False)}


def _run(tmp_path: Path, checkpoint: Path, receiver: FolderReceiver, outputs: dict) -> tuple[Path, Job]:
    data = {
        "spool_dir": str(tmp_path / "spool"),
        "database_url": f"sqlite:///{tmp_path / 'jobs.sqlite'}",
        "broker_url": f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
        "model": {"checkpoint": str(checkpoint), "device": "cpu", "tta": False},
        "outputs": outputs,
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": receiver.port}],
    }
    config_path = write_config_file(tmp_path / "node.toml", data)
    config = load_config(config_path, environ={})
    migrate(config.database_url)
    ds = pydicom.dcmread(make_phantom(tmp_path / "phantom.dcm", seed=7, size=384))
    intake = accept_instance(ds, file_meta=ds.file_meta, config=config, calling_ae="PACS")
    assert intake.outcome == IntakeOutcome.QUEUED

    from node import pipeline

    pipeline._segmenter = None  # this test's checkpoint, not an earlier one
    assert pipeline.process_job(config, job_id=intake.job_id) == "done"
    with get_sessionmaker(config.database_url)() as session:
        job = session.get(Job, intake.job_id)
    return config_path, job


def _kinds(paths: list[Path]) -> list[str]:
    return [SOP_CLASS_KIND[str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID)] for p in paths]


def test_positive_writes_and_sends_seg_sr_gsps_sc_in_order_and_resend_repeats_them(
    tmp_path: Path, checkpoints: dict[bool, Path]
) -> None:
    receiver = FolderReceiver(tmp_path / "pacs", ae_title="PACS").start()
    try:
        config_path, job = _run(tmp_path, checkpoints[True], receiver, {})
        assert job.status == JobStatus.DONE and job.positive is True, (job.status, job.error)
        assert all(getattr(job, column) for column in UID_COLUMNS), {c: getattr(job, c) for c in UID_COLUMNS}
        assert _kinds(receiver.received) == ["seg", "sr", "gsps", "sc"]
        by_kind = {kind: pydicom.dcmread(p) for kind, p in zip(_kinds(receiver.received), receiver.received,
                                                               strict=True)}
        for kind in ("seg", "sr", "gsps", "sc"):
            assert by_kind[kind].SOPInstanceUID == getattr(job, f"{kind}_sop_instance_uid")
            assert by_kind[kind].SeriesInstanceUID == getattr(job, f"{kind}_series_instance_uid")
        sr = hd.sr.srread(receiver.received[1])
        finding = sr.content.get_planar_roi_measurement_groups()[0]
        seg_reference = finding.referenced_segmentation_frame[0].ReferencedSOPSequence[0]
        assert seg_reference.ReferencedSOPInstanceUID == job.seg_sop_instance_uid
        probability = finding.get_measurements(name=hd.sr.CodedConcept("122157", "DCM", "Probability"))
        assert float(probability[0].value) == pytest.approx(job.max_probability)

        env = {k: v for k, v in os.environ.items() if not k.startswith("PTX_NODE_")}
        resend = subprocess.run([sys.executable, "-m", "node.cli", "resend", str(job.id), "--config", str(config_path)],
                                capture_output=True, text=True, timeout=120, env=env)
        assert resend.returncode == 0, resend.stderr
        assert "SEG, SR, GSPS, SC" in resend.stdout
        from node import pipeline

        config = load_config(config_path, environ={})
        assert pipeline.process_job(config, job_id=job.id) == "done"
        assert _kinds(receiver.received[4:]) == ["seg", "sr", "gsps", "sc"]
    finally:
        receiver.stop()


def test_negative_writes_what_negative_lists(tmp_path: Path, checkpoints: dict[bool, Path]) -> None:
    receiver = FolderReceiver(tmp_path / "pacs", ae_title="PACS").start()
    try:
        _, job = _run(tmp_path, checkpoints[False], receiver, {"negative": ["sc", "gsps", "sr"]})
    finally:
        receiver.stop()
    assert job.status == JobStatus.DONE and job.positive is False and job.area_px == 0
    assert _kinds(receiver.received) == ["sr", "gsps", "sc"]
    assert job.seg_sop_instance_uid is None and job.sr_sop_instance_uid and job.gsps_sop_instance_uid
    (group,) = hd.sr.srread(receiver.received[0]).content.get_image_measurement_groups()
    from pydicom.sr.codedict import codes

    assert group.get_qualitative_evaluations(name=codes.SCT.Pneumothorax)[0].value == codes.SCT.Absent
    assert "GraphicObjectSequence" not in pydicom.dcmread(receiver.received[1]).GraphicAnnotationSequence[0]


def test_migration_adds_the_sr_and_gsps_uid_columns(tmp_path: Path) -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    scripts = Config()
    scripts.set_main_option("script_location", str(Path(migrate.__code__.co_filename).parent / "migrations"))
    previous = ScriptDirectory.from_config(scripts).get_revision("0002_issue11_sr_gsps_uids").down_revision
    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    migrate(url, str(previous))
    before = {c["name"] for c in inspect(get_engine(url)).get_columns("jobs")}
    migrate(url)
    after = {c["name"] for c in inspect(get_engine(url)).get_columns("jobs")}
    added = {"sr_series_instance_uid", "sr_sop_instance_uid", "gsps_series_instance_uid", "gsps_sop_instance_uid"}
    assert not added & before and added <= after
    assert set(UID_COLUMNS) <= {c.name for c in Job.__table__.columns}

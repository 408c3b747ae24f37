"""The node's pieces on their own: config, selection, intake, sweeper, CLI.

They use a real SQLite database migrated with Alembic, real files, real datasets.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

from node.config import ConfigError, Destination, NodeConfig, load_config
from node.db import Job, JobStatus, get_sessionmaker, migrate, utcnow
from node.intake import (
    IntakeOutcome,
    accept_instance,
    selection_reason,
    selection_verdict,
    spool_filename,
)
from node.reasons import ReasonCode, exception_text_in
from node.status import StoreStatus, describe_status, is_success
from node.sweeper import jobs_to_requeue
from tests.services import pydicom_file

# --- config --------------------------------------------------------------------------------------


def test_defaults_are_the_embedded_mode() -> None:
    config = load_config(None, environ={})
    assert config.database_url.startswith("sqlite:///")
    assert config.broker_url.startswith("sqla+sqlite:///")
    assert config.embedded_broker
    assert config.outputs.diagnostic_disclaimer is True
    assert config.model.checkpoint is None and config.model.allow_untrained is False


def test_unknown_keys_are_rejected_with_their_path(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[scp]\nae_title = "X"\nprot = 104\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert "scp.prot" in str(err.value)
    assert "unknown key `prot` (did you mean `port`?)" in str(err.value)


def test_env_overrides_file_and_paths_resolve_relative_to_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('spool_dir = "spool"\ndatabase_url = "sqlite:///jobs.sqlite"\n[scp]\nport = 104\n')
    config = load_config(path, environ={"PTX_NODE_SCP__PORT": "11113", "PTX_NODE_MODEL__TTA": "false",
                                        "PTX_NODE_CONFIG": str(path)})
    assert config.scp.port == 11113
    assert config.model.tta is False
    assert config.spool_dir == tmp_path / "spool"
    assert config.database_url == f"sqlite:///{tmp_path / 'jobs.sqlite'}"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[scp]\nae_title = "THIS-TITLE-IS-TOO-LONG"\n', "AE title"),
        ('[[destinations]]\nname = "pacs"\nhost = "x"\n', "needs ae_title, port"),
        ('[[destinations]]\nname = "w"\nkind = "stow"\n', "needs url"),
        ('[[destinations]]\nname = "a"\nae_title="A"\nhost="h"\nport=1\n[[destinations]]\nname = "a"\nae_title="A"\nhost="h"\nport=2\n',
         "unique"),
        ("[outputs]\nfill_opacity = 3\n", "fill_opacity"),
    ],
)
def test_bad_values_are_rejected(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_redacted_config_masks_secrets() -> None:
    config = NodeConfig.model_validate({
        "database_url": "postgresql+psycopg://ptx:hunter2@db/ptx",
        "destinations": [{"name": "web", "kind": "stow", "url": "http://x", "password": "pw", "username": "u"}],
        "http": {"token": "tok-0123456789abcdef"},
    })
    text = json.dumps(config.redacted())
    assert "hunter2" not in text and '"pw"' not in text and "tok-0123456789abcdef" not in text


def test_backoff_doubles_up_to_the_ceiling() -> None:
    delivery = NodeConfig().delivery.model_copy(update={"backoff_initial_s": 5.0, "backoff_max_s": 30.0})
    assert [delivery.backoff_s(n) for n in range(1, 6)] == [5.0, 10.0, 20.0, 30.0, 30.0]


# --- status codes -----------------------------------------------------------------------------------


def test_status_codes() -> None:
    assert is_success(0x0000) and is_success(0xB000)
    assert not is_success(0xA700) and not is_success(0xC210)
    assert describe_status(0xA700) == "0xA700 (out of resources)"
    assert describe_status(0xC123) == "0xC123 (failure)"
    assert StoreStatus.CANNOT_DECODE == 0xC210


# --- selection ----------------------------------------------------------------------------------------


def _chest(**overrides: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = "1.2.3.4.5.6.1"
    ds.StudyInstanceUID = "1.2.3.4.5.6.2"
    ds.SeriesInstanceUID = "1.2.3.4.5.6.3"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 1024
    ds.Columns = 1024
    ds.BitsAllocated = 16
    ds.PixelData = b"\0\0" * 4
    for key, value in overrides.items():
        if value is None:
            delattr(ds, key)
        elif isinstance(value, bytes):  # as a broken archive stores it: pydicom would refuse to build it
            tag = pydicom.datadict.tag_for_keyword(key)
            ds[tag] = RawDataElement(Tag(tag), pydicom.datadict.dictionary_VR(tag), len(value), value, 0, False, True)
        else:
            setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({}, None),
        ({"BodyPartExamined": None, "ViewPosition": None}, None),
        ({"Modality": "DX", "ViewPosition": "AP"}, None),
        ({"ViewPosition": "LL"}, "view position LL is not frontal"),
        ({"Modality": "CT"}, "modality CT is not CR or DX"),
        ({"BodyPartExamined": "HAND"}, "body part HAND is not CHEST"),
        ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"}, "not grayscale (RGB"),
        ({"NumberOfFrames": 4}, "4 frames"),
        ({"Rows": 16, "Columns": 16}, "smaller than 256"),
        ({"Manufacturer": "ptx-node"}, "output of ptx-node"),
    ],
)
def test_selection_of_frontal_chest_radiographs(overrides: dict, reason: str | None) -> None:
    got = selection_reason(_chest(**overrides))
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


@pytest.mark.parametrize(
    ("overrides", "code", "sentence"),
    [
        ({"Modality": "CT"}, ReasonCode.SELECTION, "modality CT is not CR or DX"),
        ({"ViewPosition": "Dr. Who's view"}, ReasonCode.SELECTION, "view position (not a code string)"),
        ({"StudyInstanceUID": None}, ReasonCode.MISSING_UID, "Study Instance UID is missing"),
        ({"SeriesInstanceUID": "1.2.abc"}, ReasonCode.MISSING_UID, "Series Instance UID is missing or not a valid"),
        ({"PixelData": None}, ReasonCode.NO_PIXEL_DATA, "no pixel data"),
        ({"Rows": 16, "Columns": 16}, ReasonCode.IMAGE_TOO_SMALL, "16x16 is smaller than 256 px"),
        ({"BitsAllocated": None}, ReasonCode.BAD_PIXEL_MODULE, "BitsAllocated"),
        ({"Rows": 0}, ReasonCode.BAD_PIXEL_MODULE, "Rows or Columns"),
        ({"NumberOfFrames": b"many"}, ReasonCode.BAD_PIXEL_MODULE, "not a number"),
        ({"Rows": 60000, "Columns": 60000}, ReasonCode.IMAGE_TOO_LARGE, "60000x60000 at 16 bits would decode to 7200 MB"),
    ],
)
def test_selection_verdict_gives_a_code_and_a_sentence_without_header_text(
    overrides: dict, code: ReasonCode, sentence: str
) -> None:
    verdict = selection_verdict(_chest(**overrides))
    assert verdict is not None and verdict.code == code and sentence in verdict.sentence, verdict
    assert "Who" not in verdict.sentence and exception_text_in(verdict.sentence) is None


def test_pixel_data_shorter_than_the_header_says_is_skipped_before_decoding() -> None:
    verdict = selection_verdict(_chest(), transfer_syntax=ExplicitVRLittleEndian)
    assert verdict is not None and verdict.code == ReasonCode.PIXEL_DATA_SHORT
    assert "holds 8 bytes; 1024x1024 at 16 bits needs 2097152" in verdict.sentence
    # compressed pixel data has no expected length: not judged here
    assert selection_verdict(_chest(), transfer_syntax=JPEGLosslessSV1) is None
    limit = selection_verdict(_chest(), max_decoded_bytes=1024 * 1024)
    assert limit is not None and limit.code == ReasonCode.IMAGE_TOO_LARGE


def test_real_inputs_are_selected_or_skipped_for_the_right_reason() -> None:
    assert selection_reason(pydicom.dcmread(pydicom_file("RG1_UNCR.dcm"))) is None
    assert "modality CT" in selection_reason(pydicom.dcmread(pydicom_file("CT_small.dcm")))
    tiny_cr = pydicom.dcmread(pydicom_file("dicomdirtests/77654033/CR1/6154"))
    assert "body part CSPINE is not CHEST" in selection_reason(tiny_cr)
    del tiny_cr.BodyPartExamined
    del tiny_cr.ViewPosition
    assert "16x16 is smaller than 256 px" in selection_reason(tiny_cr)
    assert "modality MR" in selection_reason(pydicom.dcmread(pydicom_file("MR_small.dcm")))


def test_spool_names_never_carry_header_text() -> None:
    assert spool_filename("1.2.3.4", "ab" * 32) == "1.2.3.4." + "ab" * 6 + ".dcm"
    hostile = spool_filename("../../etc/passwd", "cd" * 32)
    assert "/" not in hostile and ".." not in hostile.split(".")[0] and hostile.endswith(".dcm")


# --- intake ----------------------------------------------------------------------------------------------


def _config(tmp_path: Path) -> NodeConfig:
    config = load_config(None, environ={}, overrides={
        "spool_dir": str(tmp_path / "spool"),
        "database_url": f"sqlite:///{tmp_path / 'jobs.sqlite'}",
    })
    migrate(config.database_url)
    return config


def _image_dataset(pixels: np.ndarray, **attrs: object) -> Dataset:
    ds = _chest(**attrs)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = attrs.get("SOPInstanceUID", generate_uid())
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "SECRET-ID-123"
    ds.PatientName = "Doe^Jane"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def _meta(ds: Dataset) -> pydicom.dataset.FileMetaDataset:
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def test_intake_spools_records_and_dedupes(tmp_path: Path) -> None:
    config = _config(tmp_path)
    pixels = np.arange(512 * 512, dtype=np.uint16).reshape(512, 512) % 4096
    ds = _image_dataset(pixels)
    first = accept_instance(ds, file_meta=_meta(ds), config=config, calling_ae="PACS", calling_host="10.0.0.1")
    again = accept_instance(ds, file_meta=_meta(ds), config=config, calling_ae="PACS")
    assert first.outcome == IntakeOutcome.QUEUED
    assert again.outcome == IntakeOutcome.DUPLICATE and again.job_id == first.job_id

    changed = _image_dataset(pixels[::-1].copy(), SOPInstanceUID=ds.SOPInstanceUID)
    third = accept_instance(changed, file_meta=_meta(changed), config=config)
    assert third.outcome == IntakeOutcome.QUEUED and third.job_id != first.job_id

    with get_sessionmaker(config.database_url)() as session:
        job = session.get(Job, first.job_id)
        assert job.status == JobStatus.RECEIVED and job.calling_ae == "PACS"
        spooled = pydicom.dcmread(job.spool_path)
        assert np.array_equal(spooled.pixel_array, pixels)
        row = json.dumps(job.summary(), default=str)
    # Neither the patient's name nor their ID is in the job row.
    assert "SECRET-ID-123" not in row and "Doe" not in row
    assert job.patient_id_hash and len(job.patient_id_hash) == 16
    # Salted with this installation's secret, not a constant anyone could replay.
    import hashlib

    assert job.patient_id_hash != hashlib.sha256(b"ptx-node:SECRET-ID-123").hexdigest()[:16]
    salt_file = tmp_path / "spool" / "patient-id.salt"
    assert oct(salt_file.stat().st_mode & 0o777) == "0o600" and len(salt_file.read_text()) == 64


def test_resending_a_failed_instance_reopens_its_job(tmp_path: Path) -> None:
    from sqlalchemy import update

    from node.db import get_engine

    config = _config(tmp_path)
    ds = _image_dataset(np.ones((512, 512)))
    first = accept_instance(ds, file_meta=_meta(ds), config=config)
    with get_engine(config.database_url).begin() as conn:
        conn.execute(update(Job).where(Job.id == first.job_id)
                     .values(status=JobStatus.FAILED, error="RuntimeError: boom", attempts=3))
    again = accept_instance(ds, file_meta=_meta(ds), config=config)
    assert again.outcome == IntakeOutcome.QUEUED and again.job_id == first.job_id
    with get_sessionmaker(config.database_url)() as session:
        job = session.get(Job, first.job_id)
        assert job.status == JobStatus.RECEIVED and job.attempts == 0 and job.error is None
        assert session.query(Job).count() == 1
    # A DONE job re-sent stays a duplicate.
    with get_engine(config.database_url).begin() as conn:
        conn.execute(update(Job).where(Job.id == first.job_id).values(status=JobStatus.DONE))
    assert accept_instance(ds, file_meta=_meta(ds), config=config).outcome == IntakeOutcome.DUPLICATE


def test_skipped_instances_leave_a_row_with_the_reason_and_no_file(tmp_path: Path) -> None:
    config = _config(tmp_path)
    ds = _image_dataset(np.zeros((512, 512)), ViewPosition="LL")
    result = accept_instance(ds, file_meta=_meta(ds), config=config)
    assert result.outcome == IntakeOutcome.SKIPPED and "LL" in result.reason
    with get_sessionmaker(config.database_url)() as session:
        job = session.get(Job, result.job_id)
        assert job.status == JobStatus.SKIPPED and "not frontal" in job.error and job.finished_at
        assert job.reason_code == "selection"
        assert job.spool_path is None
    assert not list((tmp_path / "spool").rglob("*.dcm"))


def test_intake_refuses_a_dataset_without_uid(tmp_path: Path) -> None:
    config = _config(tmp_path)
    ds = _chest(SOPInstanceUID=None)
    with pytest.raises(ValueError, match="no SOP Instance UID"):
        accept_instance(ds, file_meta=None, config=config)


# --- sweeper ------------------------------------------------------------------------------------------------


def test_sweeper_finds_exactly_the_jobs_whose_message_was_lost(tmp_path: Path) -> None:
    config = _config(tmp_path).model_copy(update={})
    now = utcnow()
    ago = lambda s: now - dt.timedelta(seconds=s)  # noqa: E731
    later = lambda s: now + dt.timedelta(seconds=s)  # noqa: E731
    rows = {
        "never published": dict(status=JobStatus.RECEIVED, received_at=ago(30), queued_at=None),
        "just received": dict(status=JobStatus.RECEIVED, received_at=now, queued_at=None),
        "queued recently": dict(status=JobStatus.QUEUED, received_at=ago(30), queued_at=ago(5)),
        "queued long ago": dict(status=JobStatus.QUEUED, received_at=ago(300), queued_at=ago(200)),
        "running, lease valid": dict(status=JobStatus.RUNNING, queued_at=ago(50), lease_until=later(60)),
        "running, lease expired": dict(status=JobStatus.RUNNING, queued_at=ago(50), lease_until=ago(10)),
        "retry due": dict(status=JobStatus.SENDING, queued_at=ago(20), next_attempt_at=ago(1)),
        "retry not due": dict(status=JobStatus.SENDING, queued_at=ago(20), next_attempt_at=later(30)),
        "done": dict(status=JobStatus.DONE, queued_at=ago(500)),
        "failed": dict(status=JobStatus.FAILED, queued_at=ago(500)),
    }
    ids = {}
    with get_sessionmaker(config.database_url)() as session:
        for name, values in rows.items():
            values.setdefault("received_at", ago(60))
            job = Job(sop_instance_uid=generate_uid(), **values)
            session.add(job)
            session.flush()
            ids[job.id] = name
        session.commit()
    found = {ids[i] for i in jobs_to_requeue(config, now=now)}
    # "queued long ago" waits behind a job being worked on: a backlog, not a lost message.
    assert found == {"never published", "running, lease expired", "retry due"}
    # Nothing is being worked on or was claimed lately, yet a worker is alive: the queue stalled.
    from node.db import WorkerRecord

    with get_sessionmaker(config.database_url)() as session:
        running = next(i for i, name in ids.items() if name == "running, lease valid")
        session.get(Job, running).status = JobStatus.DONE
        session.add(WorkerRecord(name="w:1", last_seen=ago(5), started_at=ago(100)))
        session.commit()
    found = {ids[i] for i in jobs_to_requeue(config, now=now)}
    assert found == {"never published", "queued long ago", "running, lease expired", "retry due"}


# --- CLI -------------------------------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTX_NODE_")}
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=env)


def test_cli_config_check_prints_effective_config_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[scp]\nport = 11999\n[http]\ntoken = "secret-token-0123456789"\n[model]\nallow_untrained = true\n')
    out = _cli("config", "check", str(good), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    effective = json.loads(out.stdout)
    assert effective["scp"]["port"] == 11999 and effective["http"]["token"] == "***"
    bad = tmp_path / "bad.toml"
    bad.write_text("[scp]\nporte = 1\n")
    out = _cli("config", "check", str(bad), cwd=tmp_path)
    assert out.returncode == 2 and "scp.porte" in out.stderr


def test_cli_serve_refuses_without_checkpoint_or_allow_untrained(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'database_url = "sqlite:///{tmp_path / "j.sqlite"}"\nspool_dir = "{tmp_path / "s"}"\n')
    out = _cli("serve", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 2
    assert "--allow-untrained" in out.stderr


def test_cli_jobs_lists_filters_and_shows(tmp_path: Path) -> None:
    config = _config(tmp_path)
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'database_url = "{config.database_url}"\nspool_dir = "{config.spool_dir}"\n')
    with get_sessionmaker(config.database_url)() as session:
        session.add_all([
            Job(sop_instance_uid="1.2.3", status=JobStatus.DONE, modality="CR", positive=True, max_probability=0.91,
                area_mm2=1234.0, received_at=utcnow(), finished_at=utcnow()),
            Job(sop_instance_uid="1.2.4", status=JobStatus.SKIPPED, modality="CT", error="modality CT is not CR or DX",
                reason_code="selection"),
        ])
        session.commit()
    table = _cli("jobs", "--config", str(cfg), cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "DONE" in table.stdout and "PTX" in table.stdout and "0.91" in table.stdout
    assert "[selection] modality CT is not CR or DX" in table.stdout  # the code next to the sentence
    skipped = _cli("jobs", "--config", str(cfg), "--status", "skipped", "--json", cwd=tmp_path)
    listing = json.loads(skipped.stdout)
    assert listing["database"] == config.database_url  # which database was read
    assert [r["sop_instance_uid"] for r in listing["jobs"]] == ["1.2.4"]
    assert listing["jobs"][0]["reason_code"] == "selection"
    bad = _cli("jobs", "--config", str(cfg), "--status", "WAITING", cwd=tmp_path)
    assert bad.returncode == 2 and "valid:" in bad.stderr
    show = _cli("jobs", "show", "1", "--config", str(cfg), cwd=tmp_path)
    assert show.returncode == 0 and json.loads(show.stdout)["max_probability"] == 0.91
    missing = _cli("resend", "2", "--config", str(cfg), cwd=tmp_path)
    assert missing.returncode == 1 and "no output objects" in missing.stderr


# --- the task's idempotency ----------------------------------------------------------------------------------


def test_process_job_finishes_a_half_done_job_and_leaves_a_done_job_alone(tmp_path: Path) -> None:
    import shutil

    from node.db import Delivery, DeliveryStatus
    from node.demo.receiver import FolderReceiver
    from node.pipeline import process_job

    receiver = FolderReceiver(tmp_path / "pacs", ae_title="PACS").start()
    try:
        config = _config(tmp_path)
        config = config.model_copy(update={"destinations": [
            Destination(
                name="pacs", ae_title="PACS", host="127.0.0.1", port=receiver.port)
        ]})
        out_dir = tmp_path / "spool" / "outputs" / "1"
        out_dir.mkdir(parents=True)
        source = pydicom.dcmread(pydicom_file("CT_small.dcm"))
        shutil.copyfile(pydicom_file("CT_small.dcm"), out_dir / "seg.dcm")
        with get_sessionmaker(config.database_url)() as session:
            # Crashed after writing its outputs, before delivering them.
            job = Job(sop_instance_uid=generate_uid(), status=JobStatus.SENDING, output_dir=str(out_dir),
                      seg_sop_instance_uid=str(source.SOPInstanceUID), received_at=utcnow())
            session.add(job)
            session.commit()
            job_id = job.id
        assert process_job(config, job_id=job_id) == "done"
        assert process_job(config, job_id=job_id) == "noop"
        assert len(receiver.received) == 1
        with get_sessionmaker(config.database_url)() as session:
            job = session.get(Job, job_id)
            assert job.status == JobStatus.DONE and job.delivered_at is not None
            (delivery,) = session.query(Delivery).filter_by(job_id=job_id).all()
            assert delivery.status == DeliveryStatus.DELIVERED and delivery.instances_sent == 1
    finally:
        receiver.stop()


def test_process_job_does_not_touch_a_job_another_worker_holds(tmp_path: Path) -> None:
    from node.pipeline import process_job

    config = _config(tmp_path)
    with get_sessionmaker(config.database_url)() as session:
        job = Job(sop_instance_uid=generate_uid(), status=JobStatus.RUNNING, worker="elsewhere:1",
                  lease_until=utcnow() + dt.timedelta(seconds=60), received_at=utcnow())
        session.add(job)
        session.commit()
        job_id = job.id
    assert process_job(config, job_id=job_id) == "noop"
    with get_sessionmaker(config.database_url)() as session:
        assert session.get(Job, job_id).worker == "elsewhere:1"


def test_written_config_files_load_back_identically(tmp_path: Path) -> None:
    from node.config import write_config_file

    data = {
        "spool_dir": str(tmp_path / "spool"),
        "scp": {"port": 11999, "allowed_callers": [{"ae_title": "PACS", "host": "10.0.0.5"}]},
        "model": {"allow_untrained": True, "tta": False},
        "destinations": [{"name": "a", "ae_title": "A", "host": "h", "port": 104},
                         {"name": "w", "kind": "stow", "url": "http://x/dicom-web"}],
    }
    config = load_config(write_config_file(tmp_path / "node.toml", data), environ={})
    expected = load_config(None, environ={}, overrides=data)
    # Default relative paths resolve against the file's folder vs the cwd; the rest is equal.
    relative = {"database_url", "broker_url"}
    assert config.model_dump(exclude=relative) == expected.model_dump(exclude=relative)
    assert config.scp.allowed_callers[0].host == "10.0.0.5" and config.destinations[1].kind == "stow"


def test_logs_and_tracebacks_carry_no_header_values() -> None:
    import logging

    from node.cli import RedactLibraryValues

    record = logging.LogRecord("node.pipeline", logging.ERROR, __file__, 1, "job %s: %r", (7, "Smith^John"), None)
    name, city = "Smith" + "^John", "Пет" + "ров"  # a header value, not source text the traceback quotes
    try:
        raise ValueError(f"Invalid value for VR PN: {name!r} from {city}")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    RedactLibraryValues().filter(record)
    text = logging.Formatter().format(record)
    assert "job 7" in text and "Traceback" in text and 'File "' in text
    assert "Smith" not in text and "Петров" not in text, text


def test_a_model_load_failure_is_recorded_in_words_not_the_library_text() -> None:
    from model.checkpoint import CheckpointError
    from node.config import load_config
    from node.worker import _load_failure_reason

    config = load_config(None, environ={}, overrides={"model": {"device": "cpu"}})
    torch_text = RuntimeError("Error(s) in loading state_dict for UnetPlusPlus:\n\tsize mismatch for encoder._conv_stem")
    reason = _load_failure_reason(torch_text, config)
    assert reason == "the network could not be built or run on cpu (the worker's log has the details)"
    sentence = "The weights file does not match the sha256 in manifest.json (it was changed or damaged)."
    assert _load_failure_reason(CheckpointError(sentence), config) == sentence
    assert _load_failure_reason(MemoryError(), config) == "not enough memory on cpu for the network"

"""Intake within limits: the SCP streams each data set into a file (pynetdicom's chunked
receive) and moves it into the spool; below the free-space watermark C-STORE answers
0xA700 and STOW-RS 503 before anything is written; a re-sent instance of a FAILED job
whose spool file is gone is spooled again and the job reopened."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from sqlalchemy import update

from node.db import Job, JobStatus, get_engine
from node.demo.pacs import wait_until
from node.disk import SpoolFullError, spool_space
from node.intake import IntakeOutcome, accept_instance
from node.received import read_received
from tests.scp_helpers import associations, chest_file, jobs, node_config, running_scp, storescu
from tests.services import pydicom_file, require_tool

NEVER_ENOUGH = {"min_free_percent": 100.0}  # a threshold above the real free space


def _pixel_sha(path: Path) -> str:
    return hashlib.sha256(pydicom.dcmread(path).PixelData).hexdigest()


def _spooled(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "spool" / "incoming").glob("*.dcm")) if (tmp_path / "spool" / "incoming").exists() else []


def _leftovers(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "spool").rglob("*") if p.is_file() and p.suffix != ".salt"
            and "incoming" not in p.parts]


def _variants(tmp_path: Path) -> list[Path]:
    """Radiographs in the transfer syntaxes whose reading differs (dcmconv converts)."""
    dcmconv = require_tool("dcmconv")
    native = chest_file(tmp_path / "in", seed=1)
    converted = []
    for seed, option in ((2, "+tb"), (3, "+td")):  # explicit big endian, deflated
        target = tmp_path / "in" / f"converted-{option[1:]}.dcm"
        subprocess.run([dcmconv, option, str(chest_file(tmp_path / "in", seed=seed)), str(target)], check=True,
                       timeout=60)
        converted.append(target)
    return [native, *converted, pydicom_file("RG1_J2KR.dcm")]


# --- chunked receive -----------------------------------------------------------------------------------------


def test_chunked_receive_spools_what_was_sent_with_the_same_hash_as_every_other_path(tmp_path: Path) -> None:
    config = node_config(tmp_path)
    files = _variants(tmp_path)
    ct = pydicom_file("CT_small.dcm")
    with running_scp(config) as scp:
        # Each in its own transfer syntax: -xb proposes big endian first, -xd deflate, -xv JPEG 2000.
        for path, proposal in zip([*files, ct], ([], ["-xb"], ["-xd"], ["-xv"], []), strict=True):
            sent = storescu(scp.port, [path], *proposal)
            assert sent.returncode == 0, sent.stdout + sent.stderr
        rows = jobs(config)
        assert [j.status for j in rows] == [JobStatus.RECEIVED] * len(files) + [JobStatus.SKIPPED]
        for job, original in zip(rows, files, strict=False):
            spooled = pydicom.dcmread(job.spool_path)
            source = pydicom.dcmread(original)
            assert spooled.SOPInstanceUID == source.SOPInstanceUID
            assert str(spooled.file_meta.TransferSyntaxUID) == job.transfer_syntax_uid
            assert np.array_equal(spooled.pixel_array, source.pixel_array)
            # The hash from the streamed file equals the one intake takes from a decoded data set
            # (STOW-RS, earlier rows), so duplicates are found across both.
            assert job.pixel_sha256 == _pixel_sha(Path(job.spool_path)) == read_received(Path(job.spool_path)).pixel_sha256
        assert rows[0].pixel_sha256 == _pixel_sha(files[0])

        again = storescu(scp.port, files[:1])
        assert again.returncode == 0 and len(jobs(config)) == len(files) + 1
        ds = pydicom.dcmread(files[0])
        assert accept_instance(ds, file_meta=ds.file_meta, config=config).outcome == IntakeOutcome.DUPLICATE
    # Nothing left where pynetdicom received the data sets.
    assert not _leftovers(tmp_path), _leftovers(tmp_path)


def _raw_file(folder: Path, name: str, data_set: bytes, sop_instance_uid: str) -> Path:
    """A Part 10 file whose meta names an instance, followed by arbitrary data set bytes."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / name
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, meta)
        fh.write(data_set)
    return path


def test_malformed_data_sets_are_refused_and_leave_no_file(tmp_path: Path) -> None:
    from pynetdicom import AE, _config

    config = node_config(tmp_path)
    good = pydicom.dcmread(chest_file(tmp_path / "in"))
    no_uid = pydicom.Dataset(good)
    del no_uid.SOPInstanceUID
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, no_uid)  # explicit VR little endian, as the meta says
    malformed = [
        _raw_file(tmp_path, "no-uid.dcm", buffer.getvalue(), "1.2.826.0.1.3680043.10.1"),
        _raw_file(tmp_path, "truncated.dcm", buffer.getvalue()[:700], "1.2.826.0.1.3680043.10.2"),
        _raw_file(tmp_path, "garbage.dcm", b"\xff\xfe" * 4000, "1.2.826.0.1.3680043.10.3"),
    ]
    statuses = []
    with running_scp(config) as scp:
        ae = AE(ae_title="FUZZ")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1")
        ae.dimse_timeout = 30
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
        try:
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="PTXNODE")
            assert assoc.is_established
            statuses = [int(assoc.send_c_store(path).Status) for path in malformed]
            assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
        assert all(status in (0xC000, 0xC210) for status in statuses), [hex(s) for s in statuses]
        assert not jobs(config) and not _spooled(tmp_path)
        # The listener is still there for the next good image.
        assert storescu(scp.port, [chest_file(tmp_path / "in", seed=9)]).returncode == 0
    assert [j.status for j in jobs(config)] == [JobStatus.RECEIVED]
    assert not _leftovers(tmp_path), _leftovers(tmp_path)


def test_a_c_store_without_affected_sop_instance_uid_is_aborted_not_left_hanging(tmp_path: Path) -> None:
    from pynetdicom import AE

    config = node_config(tmp_path)
    ds = pydicom.dcmread(chest_file(tmp_path / "in"))
    ds.SOPInstanceUID = ""  # the C-STORE-RQ then carries no Affected SOP Instance UID
    with running_scp(config) as scp:
        ae = AE(ae_title="FUZZ")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1")
        ae.dimse_timeout = 60
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="PTXNODE")
        assert assoc.is_established
        started = time.monotonic()
        status = assoc.send_c_store(ds)
        assert time.monotonic() - started < 30  # aborted at once, not after the sender's timeout
        assert "Status" not in status
        wait_until(lambda: not assoc.is_established, 20, what="the association to end")
        wait_until(lambda: not _leftovers(tmp_path), 20, what="the partial receive file to be removed")
        assert storescu(scp.port, [chest_file(tmp_path / "in", seed=8)]).returncode == 0
    assert [j.status for j in jobs(config)] == [JobStatus.RECEIVED]
    assert all(a.ended_at is not None for a in associations(config))


# --- disk watermark -----------------------------------------------------------------------------------------


def test_below_the_watermark_c_store_answers_a700_before_writing(tmp_path: Path) -> None:
    image = chest_file(tmp_path / "in")
    full = node_config(tmp_path, disk=NEVER_ENOUGH)
    assert spool_space(full).low
    with running_scp(full) as scp:
        refused = storescu(scp.port, [image], "-v")
    assert "Received Store Response (Refused: OutOfResources)" in refused.stderr, refused.stdout + refused.stderr
    assert not jobs(full) and not _spooled(tmp_path) and not _leftovers(tmp_path)

    room = node_config(tmp_path, disk={"min_free_percent": 0.0, "min_free_mb": 1.0})
    assert not spool_space(room).low
    with running_scp(room) as scp:
        accepted = storescu(scp.port, [image], "-v")
    assert accepted.returncode == 0 and "Received Store Response (Success)" in accepted.stderr, accepted.stderr
    assert [j.status for j in jobs(room)] == [JobStatus.RECEIVED] and len(_spooled(tmp_path)) == 1


def test_the_embedded_database_keeps_a_reserve_on_the_spool_disk(tmp_path: Path) -> None:
    embedded = node_config(tmp_path, disk={"min_free_mb": 10.0, "min_free_percent": 0.0, "database_reserve_mb": 500.0})
    space = spool_space(embedded)
    assert space.database_reserve_bytes == 500 << 20 and space.min_free_bytes == 510 << 20
    assert "job database" in space.describe()
    # Just enough free for intake, but not for intake plus the reserve: refused.
    free_mb = space.free_bytes / (1 << 20)
    tight = node_config(tmp_path, disk={"min_free_mb": free_mb - 100, "min_free_percent": 0.0,
                                        "database_reserve_mb": 200.0})
    ds = pydicom.dcmread(chest_file(tmp_path / "in"))
    with pytest.raises(SpoolFullError, match="kept for the job database"):
        accept_instance(ds, file_meta=ds.file_meta, config=tight)
    # PostgreSQL is elsewhere: no reserve on the spool disk.
    remote = embedded.model_copy(update={"database_url": "postgresql+psycopg://ptx@db.example/ptx"})
    assert spool_space(remote).database_reserve_bytes == 0


def test_below_the_watermark_stow_answers_503_with_retry_after_and_reads_nothing(tmp_path: Path) -> None:
    from node.http import start_http_server

    config = node_config(tmp_path, disk=NEVER_ENOUGH, http={"port": 0, "token": "disk-test-token-0123"},
                         broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}")
    body = chest_file(tmp_path / "in").read_bytes()
    boundary = "disk-boundary"
    payload = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + body
               + f"\r\n--{boundary}--\r\n".encode())
    handle = start_http_server(config)
    try:
        response = httpx.post(f"{handle.url}/dicom-web/studies", content=payload, timeout=60, headers={
            "Authorization": "Bearer disk-test-token-0123",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        metrics = httpx.get(f"{handle.url}/metrics", headers={"Authorization": "Bearer disk-test-token-0123"}).text
        page = httpx.get(f"{handle.url}/", headers={"Authorization": "Bearer disk-test-token-0123"}).text
    finally:
        handle.stop()
    assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
    assert "intake paused" in response.json()["error"]
    assert not jobs(config) and not _spooled(tmp_path) and not _leftovers(tmp_path)
    assert "ptx_intake_paused 1.0" in metrics and "ptx_spool_free_bytes" in metrics
    assert 'id=disk data-paused="true"' in page and "intake PAUSED" in page


# --- a FAILED job whose spool file is gone --------------------------------------------------------------------


def test_resent_instance_of_a_failed_job_without_its_spool_file_is_spooled_again(tmp_path: Path) -> None:
    config = node_config(tmp_path)
    image = chest_file(tmp_path / "in")
    with running_scp(config) as scp:
        assert storescu(scp.port, [image]).returncode == 0
        (job,) = jobs(config)
        with get_engine(config.database_url).begin() as conn:
            conn.execute(update(Job).where(Job.id == job.id).values(status=JobStatus.FAILED, error="worker lost",
                                                                    attempts=3))
        Path(job.spool_path).unlink()  # retention, or an admin cleaning up
        assert storescu(scp.port, [image]).returncode == 0
    (reopened,) = jobs(config)
    assert reopened.id == job.id and reopened.status == JobStatus.RECEIVED and reopened.attempts == 0
    assert Path(reopened.spool_path).exists()
    assert np.array_equal(pydicom.dcmread(reopened.spool_path).pixel_array, pydicom.dcmread(image).pixel_array)
    shutil.rmtree(tmp_path / "spool" / "incoming")
    with get_engine(config.database_url).begin() as conn:
        conn.execute(update(Job).where(Job.id == job.id).values(status=JobStatus.FAILED))
    ds = pydicom.dcmread(image)  # the same over STOW-RS's path (a decoded data set)
    assert accept_instance(ds, file_meta=ds.file_meta, config=config).outcome == IntakeOutcome.QUEUED
    assert Path(jobs(config)[0].spool_path).exists()

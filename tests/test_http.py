"""The node's HTTP server, started in-process on a free port against a migrated
SQLite database: token rules, /jobs, /associations, /metrics, the status page and
STOW-RS intake (real multipart requests over a real socket)."""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.config import NodeConfig, load_config
from node.db import (
    Association,
    Delivery,
    Job,
    JobStatus,
    WorkerRecord,
    get_sessionmaker,
    migrate,
    utcnow,
)
from node.http import HttpConfigError, HttpServerHandle, create_app, start_http_server
from node.http.app import TOKEN_COOKIE
from tests.services import pydicom_file

TOKEN = "test-token-5f2c-91ab"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"


@pytest.fixture(scope="session")
def broker_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One broker for the session: the process's one Celery app keeps its first connection pool.
    return f"sqla+sqlite:///{tmp_path_factory.mktemp('broker') / 'broker.sqlite'}"


def make_config(tmp_path: Path, broker_url: str, **http: object) -> NodeConfig:
    config = load_config(
        None,
        environ={},
        overrides={
            "database_url": f"sqlite:///{tmp_path / 'jobs.sqlite'}",
            "spool_dir": str(tmp_path / "spool"),
            "broker_url": broker_url,
            "http": {"port": 0, "token": TOKEN, **http},
        },
    )
    migrate(config.database_url)
    return config


@pytest.fixture
def config(tmp_path: Path, broker_url: str) -> NodeConfig:
    return make_config(tmp_path, broker_url)


@pytest.fixture
def server(config: NodeConfig) -> Iterator[HttpServerHandle]:
    handle = start_http_server(config)
    try:
        yield handle
    finally:
        handle.stop()
    assert not handle.running


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def multipart(parts: list[bytes], boundary: str = "b0undary-test") -> tuple[bytes, str]:
    """A multipart/related body built by hand, independent of node.dicomweb."""
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" for part in parts
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(server: HttpServerHandle, parts: list[bytes], path: str = "/dicom-web/studies",
         headers: dict[str, str] | None = None) -> httpx.Response:
    body, content_type = multipart(parts)
    return httpx.post(server.url + path, content=body,
                      headers={"Content-Type": content_type, "Accept": "application/dicom+json", **(headers or auth())},
                      timeout=60)


def jobs_in(config: NodeConfig) -> list[Job]:
    from sqlalchemy import select

    with get_sessionmaker(config.database_url)() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def associations_in(config: NodeConfig) -> list[Association]:
    from sqlalchemy import select

    with get_sessionmaker(config.database_url)() as session:
        return list(session.scalars(select(Association).order_by(Association.id)))


def add_jobs(config: NodeConfig) -> dict[str, Job]:
    """Job rows in several states with known timings, as a worker would leave them."""
    now = utcnow()
    t0 = now - dt.timedelta(minutes=10)
    rows = {
        "done": Job(status=JobStatus.DONE, source="dimse", calling_ae="ORTHANC", sop_instance_uid="1.2.3.1",
                    study_instance_uid="1.2.3", modality="CR", received_at=t0, queued_at=t0,
                    started_at=t0 + dt.timedelta(seconds=1), finished_at=t0 + dt.timedelta(seconds=4),
                    delivered_at=t0 + dt.timedelta(seconds=5), inference_ms=700.0, positive=True,
                    max_probability=0.91, area_px=1234, attempts=1, model_name="ptx-unetpp-b4", model_version="1.0",
                    seg_sop_instance_uid="1.2.3.1.1", sr_sop_instance_uid="1.2.3.1.2",
                    gsps_sop_instance_uid="1.2.3.1.3", sc_sop_instance_uid="1.2.3.1.4"),
        "failed": Job(status=JobStatus.FAILED, source="stow", sop_instance_uid="1.2.3.2", modality="DX",
                      received_at=t0, started_at=t0 + dt.timedelta(seconds=2), finished_at=t0 + dt.timedelta(seconds=3),
                      error="delivery to pacs failed after 4 attempts: association rejected", attempts=3),
        "queued": Job(status=JobStatus.QUEUED, sop_instance_uid="1.2.3.3", received_at=now - dt.timedelta(days=2)),
        "received": Job(status=JobStatus.RECEIVED, sop_instance_uid="1.2.3.4", received_at=now),
        "skipped": Job(status=JobStatus.SKIPPED, sop_instance_uid="1.2.3.5", modality="CT",
                       error="modality CT is not CR or DX", received_at=now),
    }
    with get_sessionmaker(config.database_url)() as session:
        session.add_all(rows.values())
        session.flush()
        session.add(Delivery(job_id=rows["done"].id, destination="pacs", object_kind="SEG", status="DELIVERED",
                             attempts=3))
        session.add(Delivery(job_id=rows["failed"].id, destination="pacs", object_kind="SEG", status="FAILED", attempts=4,
                             last_error="association rejected"))
        session.add(WorkerRecord(name="gpu-box-1:4242", device="cuda:0", model_name="ptx-unetpp-b4",
                                 model_version="1.0", last_seen=now))
        session.add(WorkerRecord(name="old-box:1", device="cpu", last_seen=now - dt.timedelta(hours=1)))
        session.commit()
    return rows


# --- tokens and exposure ---------------------------------------------------------------------


def test_healthz_needs_no_token(server: HttpServerHandle) -> None:
    response = httpx.get(server.url + "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


def test_everything_else_needs_the_token(server: HttpServerHandle) -> None:
    for path in ("/jobs", "/jobs/1", "/associations", "/metrics", "/"):
        response = httpx.get(server.url + path)
        assert response.status_code == 401, path
        assert "Bearer" in response.headers["www-authenticate"]
        assert httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server.url + "/jobs", headers=auth()).status_code == 200
    # Never in the URL: it would end up in proxy logs and browser history.
    in_query = httpx.get(server.url + "/jobs", params={"token": TOKEN})
    assert in_query.status_code == 401 and "not accepted" in in_query.json()["error"]
    assert httpx.get(server.url + "/", params={"token": TOKEN}).status_code == 401
    # HTTP Basic with the token as password: how archives configure a DICOMweb peer.
    assert httpx.get(server.url + "/jobs", auth=("anyone", TOKEN)).status_code == 200
    assert httpx.get(server.url + "/jobs", auth=("anyone", "nope")).status_code == 401


def test_status_page_login_form_sets_the_cookie(server: HttpServerHandle) -> None:
    with httpx.Client(base_url=server.url) as client:
        first = client.get("/")
        assert first.status_code == 401 and 'id=login method=post action=login' in first.text
        assert "Basic" not in first.headers["www-authenticate"]  # no browser pop-up over the form
        wrong = client.post("/login", data={"token": "not-the-token-at-all"})
        assert wrong.status_code == 401 and "Wrong token" in wrong.text and TOKEN_COOKIE not in client.cookies
        signed_in = client.post("/login", data={"token": TOKEN})
        assert signed_in.status_code == 303 and TOKEN not in signed_in.headers["location"]
        assert "httponly" in signed_in.headers["set-cookie"].lower()
        page = client.get("/")  # the cookie alone now authorizes
        assert page.status_code == 200
        assert "ptx-node" in page.text and "Jobs by status" in page.text


def test_open_server_refused_off_loopback(tmp_path: Path, broker_url: str) -> None:
    config = make_config(tmp_path, broker_url, token=None, bind_address="0.0.0.0")
    with pytest.raises(HttpConfigError, match="no http.token"):
        start_http_server(config)
    with pytest.raises(HttpConfigError):
        create_app(config)
    loopback = make_config(tmp_path, broker_url, token=None)
    handle = start_http_server(loopback)
    try:
        assert httpx.get(handle.url + "/jobs").status_code == 200  # no token needed on loopback
    finally:
        handle.stop()


# --- JSON API --------------------------------------------------------------------------------


def test_jobs_filters_and_detail(config: NodeConfig, server: HttpServerHandle) -> None:
    rows = add_jobs(config)
    listing = httpx.get(server.url + "/jobs", headers=auth()).json()
    assert listing["count"] == 5
    assert [j["id"] for j in listing["jobs"]] == sorted((r.id for r in rows.values()), reverse=True)

    failed = httpx.get(server.url + "/jobs", params={"status": "FAILED"}, headers=auth()).json()
    assert [j["id"] for j in failed["jobs"]] == [rows["failed"].id]
    assert failed["jobs"][0]["error"].startswith("delivery to pacs failed")
    assert failed["jobs"][0]["deliveries"][0]["attempts"] == 4

    two = httpx.get(server.url + "/jobs", params=[("status", "done,skipped")], headers=auth()).json()
    assert {j["status"] for j in two["jobs"]} == {"DONE", "SKIPPED"}
    recent = httpx.get(server.url + "/jobs", params={"since": "1d"}, headers=auth()).json()
    assert rows["queued"].id not in {j["id"] for j in recent["jobs"]} and recent["count"] == 4
    assert httpx.get(server.url + "/jobs", params={"limit": 2}, headers=auth()).json()["count"] == 2

    bad = httpx.get(server.url + "/jobs", params={"status": "LOST"}, headers=auth())
    assert bad.status_code == 400 and "RECEIVED" in bad.json()["error"]
    assert httpx.get(server.url + "/jobs", params={"since": "yesterday"}, headers=auth()).status_code == 400

    one = httpx.get(server.url + f"/jobs/{rows['done'].id}", headers=auth())
    assert one.status_code == 200
    assert one.json()["sop_instance_uid"] == "1.2.3.1" and one.json()["inference_ms"] == 700.0
    assert httpx.get(server.url + "/jobs/999999", headers=auth()).status_code == 404


def test_metrics_parse_as_prometheus_text(config: NodeConfig, server: HttpServerHandle) -> None:
    add_jobs(config)
    response = httpx.get(server.url + "/metrics", headers=auth())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, tuple], float] = {}
    families = {}
    for family in text_string_to_metric_families(response.text):
        families[family.name] = family
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("ptx_database_up", ())] == 1
    assert samples[("ptx_jobs", (("status", "DONE"),))] == 1
    assert samples[("ptx_jobs", (("status", "FAILED"),))] == 1
    assert samples[("ptx_jobs", (("status", "RUNNING"),))] == 0
    assert samples[("ptx_queue_depth", ())] == 2  # RECEIVED + QUEUED
    assert samples[("ptx_workers_alive", (("device", "cuda:0"),))] == 1
    assert ("ptx_workers_alive", (("device", "cpu"),)) not in samples
    assert families["ptx_job_stage_seconds"].type == "histogram"
    # total: only the DONE job has received and delivered (5 s); process: DONE 3 s and FAILED 1 s.
    assert samples[("ptx_job_stage_seconds_count", (("stage", "total"),))] == 1
    assert samples[("ptx_job_stage_seconds_sum", (("stage", "total"),))] == pytest.approx(5.0, abs=0.01)
    assert samples[("ptx_job_stage_seconds_bucket", (("le", "2.0"), ("stage", "total")))] == 0
    assert samples[("ptx_job_stage_seconds_bucket", (("le", "5.0"), ("stage", "total")))] == 1
    assert samples[("ptx_job_stage_seconds_count", (("stage", "process"),))] == 2
    assert samples[("ptx_job_stage_seconds_sum", (("stage", "process"),))] == pytest.approx(4.0, abs=0.01)
    assert samples[("ptx_inference_seconds_count", ())] == 1
    assert samples[("ptx_inference_seconds_sum", ())] == pytest.approx(0.7)
    assert samples[("ptx_inference_seconds_bucket", (("le", "0.5"),))] == 0
    assert samples[("ptx_inference_seconds_bucket", (("le", "1.0"),))] == 1
    # Counted where a delivery fails (never derived from rows, which resend resets): none happened here.
    assert families["ptx_delivery_retries"].type == "counter"
    assert not [k for k in samples if k[0] == "ptx_delivery_retries_total"]


def test_status_page_shows_jobs_workers_and_model(config: NodeConfig, server: HttpServerHandle) -> None:
    rows = add_jobs(config)
    page = httpx.get(server.url + "/", headers=auth())
    assert page.status_code == 200
    html = page.text
    for key, row in rows.items():
        assert f'id="job-{row.id}" data-status="{row.status}"' in html, key
    assert "delivery to pacs failed after 4 attempts" in html
    assert "modality CT is not CR or DX" in html
    assert '<div class=card id=queue-depth><b>2</b>' in html
    assert '<div class=card id=workers-alive><b>1</b>' in html
    assert "gpu-box-1:4242" in html and "cuda:0" in html
    assert "ptx-unetpp-b4 1.0" in html  # the model being served, from the live worker
    assert "p50 latency" in html and "5.00 s" in html
    # the objects written for the done job, in delivery order, each with its UID
    objects = html.split(f'id="job-{rows["done"].id}"')[1].split("</tr>")[0]
    spans = [(kind, uid) for kind, uid in re.findall(r'data-object="(\w+)" title="([\d.]+)"', objects)]
    assert spans == [("seg", "1.2.3.1.1"), ("sr", "1.2.3.1.2"), ("gsps", "1.2.3.1.3"), ("sc", "1.2.3.1.4")]
    detail = httpx.get(server.url + f"/jobs/{rows['done'].id}", headers=auth()).json()
    assert detail["sr_sop_instance_uid"] == "1.2.3.1.2" and detail["gsps_sop_instance_uid"] == "1.2.3.1.3"


# --- STOW-RS intake --------------------------------------------------------------------------


def test_stow_intake_of_a_chest_radiograph(config: NodeConfig, server: HttpServerHandle) -> None:
    path = pydicom_file("RG1_UNCR.dcm")
    source = pydicom.dcmread(path)
    response = stow(server, [path.read_bytes()])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    payload = response.json()
    refs = payload[REFERENCED_SOP_SEQUENCE]["Value"]
    assert [r[REFERENCED_SOP_INSTANCE_UID]["Value"][0] for r in refs] == [source.SOPInstanceUID]
    assert FAILED_SOP_SEQUENCE not in payload

    [job] = jobs_in(config)
    assert job.status == JobStatus.QUEUED and job.queued_at is not None  # handed to the broker
    assert job.source == "stow" and job.calling_host == "127.0.0.1"
    assert job.sop_instance_uid == source.SOPInstanceUID
    assert job.spool_path and Path(job.spool_path).is_file()
    assert pydicom.dcmread(job.spool_path).SOPInstanceUID == source.SOPInstanceUID
    assert not list((config.spool_dir / "upload").iterdir())  # the upload's temp file is gone

    [assoc] = associations_in(config)
    assert assoc.protocol == "stow" and assoc.accepted
    assert assoc.peer_address == "127.0.0.1"
    assert (assoc.instances_accepted, assoc.instances_rejected) == (1, 0)

    # Same instance again: stored (200), no second job.
    assert stow(server, [path.read_bytes()]).status_code == 200
    assert len(jobs_in(config)) == 1


def test_stow_ct_is_stored_and_skipped(config: NodeConfig, server: HttpServerHandle) -> None:
    path = pydicom_file("CT_small.dcm")
    response = stow(server, [path.read_bytes()])
    assert response.status_code == 200
    assert REFERENCED_SOP_SEQUENCE in response.json()
    [job] = jobs_in(config)
    assert job.status == JobStatus.SKIPPED
    assert job.error and "modality CT" in job.error and job.reason_code == "selection"
    assert job.spool_path is None
    page = httpx.get(server.url + "/", headers=auth())
    assert "[selection] modality CT is not CR or DX" in page.text  # the code next to the sentence


def test_stow_garbage_part_listed_as_failed(config: NodeConfig, server: HttpServerHandle) -> None:
    good = pydicom_file("RG1_UNCR.dcm")
    response = stow(server, [b"this is not DICOM at all", good.read_bytes()])
    assert response.status_code == 202  # some stored, some failed
    payload = response.json()
    [failed] = payload[FAILED_SOP_SEQUENCE]["Value"]
    assert failed[FAILURE_REASON]["Value"] == [0xC000]
    assert len(payload[REFERENCED_SOP_SEQUENCE]["Value"]) == 1
    assert len(jobs_in(config)) == 1
    assoc = associations_in(config)[-1]
    assert (assoc.instances_accepted, assoc.instances_rejected) == (1, 1)

    only_garbage = stow(server, [b"\x00" * 300])
    assert only_garbage.status_code == 409  # nothing stored
    assert only_garbage.json()[FAILED_SOP_SEQUENCE]["Value"][0][FAILURE_REASON]["Value"] == [0xC000]


def test_stow_to_a_study_rejects_other_studies(config: NodeConfig, server: HttpServerHandle) -> None:
    path = pydicom_file("RG1_UNCR.dcm")
    study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    wrong = stow(server, [path.read_bytes()], path="/dicom-web/studies/1.2.826.0.1.999")
    assert wrong.status_code == 409
    assert wrong.json()[FAILED_SOP_SEQUENCE]["Value"][0][FAILURE_REASON]["Value"] == [0xA900]
    assert jobs_in(config) == []
    right = stow(server, [path.read_bytes()], path=f"/dicom-web/studies/{study}")
    assert right.status_code == 200 and len(jobs_in(config)) == 1


def test_stow_refusals_are_logged_as_associations(config: NodeConfig, server: HttpServerHandle) -> None:
    path = pydicom_file("RG1_UNCR.dcm")
    refused = stow(server, [path.read_bytes()], headers={"Authorization": "Bearer stolen"})
    assert refused.status_code == 401
    not_multipart = httpx.post(server.url + "/dicom-web/studies", content=path.read_bytes(),
                               headers={"Content-Type": "application/dicom", **auth()})
    assert not_multipart.status_code == 415
    no_boundary = httpx.post(server.url + "/dicom-web/studies", content=b"--x\r\n",
                             headers={"Content-Type": "multipart/related; type=\"application/dicom\"", **auth()})
    assert no_boundary.status_code == 400
    assert jobs_in(config) == []
    log = [(a.protocol, a.accepted, a.reject_reason) for a in associations_in(config)]
    assert log[0] == ("stow", False, "HTTP 401: wrong token")
    assert log[1][1] is False and log[1][2].startswith("HTTP 415")
    assert log[2][1] is False and log[2][2].startswith("HTTP 400")
    listed = httpx.get(server.url + "/associations", params={"accepted": "false"}, headers=auth()).json()
    assert listed["count"] == 3 and listed["associations"][-1]["reject_reason"] == "HTTP 401: wrong token"
    page = httpx.get(server.url + "/", headers=auth()).text
    assert "HTTP 401: wrong token" in page


def test_no_patient_name_anywhere(config: NodeConfig, server: HttpServerHandle, tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm"))
    ds.PatientName = "Doe^Janet"
    ds.PatientID = "MRN-77-2231"
    ds.SOPInstanceUID = f"2.25.{uuid.uuid4().int}"
    tagged = tmp_path / "named.dcm"
    ds.save_as(tagged, enforce_file_format=True)
    assert stow(server, [tagged.read_bytes()]).status_code == 200
    texts = [
        httpx.get(server.url + "/", headers=auth()).text,
        httpx.get(server.url + "/jobs", headers=auth()).text,
        httpx.get(server.url + "/associations", headers=auth()).text,
        httpx.get(server.url + "/metrics", headers=auth()).text,
    ]
    for text in texts:
        assert "Doe" not in text and "Janet" not in text and "MRN-77-2231" not in text
    [job] = json.loads(texts[1])["jobs"]
    assert job["patient_id_hash"] and job["patient_id_hash"] != "MRN-77-2231"


def test_metrics_and_status_page_on_postgresql(postgres_url: str, broker_url: str, tmp_path: Path) -> None:
    """The scrape-time SQL (stage durations, bucket sums) in PostgreSQL's dialect."""
    config = load_config(None, environ={}, overrides={
        "database_url": postgres_url, "spool_dir": str(tmp_path / "spool"), "broker_url": broker_url,
        "http": {"port": 0, "token": TOKEN},
    })
    migrate(config.database_url)
    rows = add_jobs(config)
    from node.metrics import count_event

    for _ in range(5):  # PostgreSQL's upsert (INSERT ... ON CONFLICT DO UPDATE), first and later increments
        count_event(config.database_url, "ptx_delivery_retries_total", {"destination": "pacs"})
    handle = start_http_server(config)
    try:
        text = httpx.get(handle.url + "/metrics", headers=auth()).text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        assert samples[("ptx_database_up", ())] == 1
        assert samples[("ptx_queue_depth", ())] == 2
        assert samples[("ptx_job_stage_seconds_sum", (("stage", "total"),))] == pytest.approx(5.0)
        assert samples[("ptx_job_stage_seconds_bucket", (("le", "5.0"), ("stage", "total")))] == 1
        assert samples[("ptx_job_stage_seconds_count", (("stage", "process"),))] == 2
        assert samples[("ptx_delivery_retries_total", (("destination", "pacs"),))] == 5
        page = httpx.get(handle.url + "/", headers=auth()).text
        assert f'id="job-{rows["failed"].id}" data-status="FAILED"' in page
        failed = httpx.get(handle.url + "/jobs", params={"status": "FAILED", "since": "1h"}, headers=auth()).json()
        assert [j["id"] for j in failed["jobs"]] == [rows["failed"].id]
    finally:
        handle.stop()

"""Issue 10, STOW-RS and HTTP: a bounded, linear-time upload path (size, parts, header
lines, slow bodies, concurrent uploads), intake of what real DICOMweb clients send
(dicomweb-client, Orthanc), token roles and DNS-rebinding protection, and refusals
counted per caller and minute instead of one row each. Every server here is the
node's real HTTP server (uvicorn) or SCP (pynetdicom) on a free port."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from node.config import AllowedCaller, ConfigError, NodeConfig, load_config
from node.db import Association, Job, get_sessionmaker, migrate
from node.demo.pacs import free_port
from node.http import HttpServerHandle, start_http_server
from node.refusals import MAX_ROWS_PER_PEER_MINUTE, record_refusal
from node.scp import StoreSCP
from tests.services import Orthanc, pydicom_file

TOKEN = "limits-admin-token-0f9e"
STOW_TOKEN = "limits-stow-token-77c1"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILURE_REASON = "00081197"


def make_config(tmp_path: Path, **http: object) -> NodeConfig:
    overrides = {
        "database_url": f"sqlite:///{tmp_path / 'jobs.sqlite'}",
        "spool_dir": str(tmp_path / "spool"),
        "broker_url": f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
        "http": {"port": 0, "token": TOKEN, **http},
        "scp": {"port": free_port()},
    }
    config = load_config(None, environ={}, overrides=overrides)
    migrate(config.database_url)
    return config


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """serve(**http options) -> (config, running HTTP server); stopped after the test."""
    handles: list[HttpServerHandle] = []

    def start(**http: object) -> tuple[NodeConfig, HttpServerHandle]:
        config = make_config(tmp_path, **http)
        handles.append(start_http_server(config))
        return config, handles[-1]

    yield start
    for handle in handles:
        handle.stop()


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def multipart(parts: list[bytes], part_types: list[str] | None = None, boundary: str = "lim1ts") -> tuple[bytes, str]:
    types = part_types or ["application/dicom"] * len(parts)
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: " + t.encode() + b"\r\n\r\n" + p + b"\r\n"
                    for p, t in zip(parts, types, strict=True))
    return body + b"--" + boundary.encode() + b"--\r\n", f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(server: HttpServerHandle, body: bytes, content_type: str, token: str = TOKEN, **kwargs) -> httpx.Response:
    return httpx.post(server.url + "/dicom-web/studies", content=body,
                      headers={"Content-Type": content_type, **bearer(token)}, timeout=60, **kwargs)


def jobs_in(config: NodeConfig) -> list[Job]:
    with get_sessionmaker(config.database_url)() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def refusals_in(config: NodeConfig) -> list[Association]:
    with get_sessionmaker(config.database_url)() as session:
        return list(session.scalars(select(Association).where(Association.accepted.is_(False))
                                    .order_by(Association.id)))


def uploads_left(config: NodeConfig) -> list[Path]:
    folder = config.spool_dir / "upload"
    return list(folder.iterdir()) if folder.exists() else []


def raw_http(server: HttpServerHandle, head: bytes, body: bytes = b"", *, timeout: float = 20) -> tuple[int, bytes]:
    """Send bytes as they are and read the answer: for requests no HTTP client would send."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _content_length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


def _content_length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def radiograph(uid: str | None = None) -> Dataset:
    ds = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm"))
    ds.SOPInstanceUID = uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def encoded(ds: Dataset, **write_args: object) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, **write_args)
    return buffer.getvalue()


# --- no quadratic parsing --------------------------------------------------------------------


def test_24kb_part_content_type_answers_at_once_while_c_echo_answers(serve) -> None:
    """On the regex parser this request took 11 s and starved the DICOM listener meanwhile."""
    config, server = serve()
    scp = StoreSCP(config, None)
    scp.start()
    try:
        body, content_type = multipart([b"x" * 100], part_types=["application/dicom;" + " " * 24_000 + "x"])
        answer: dict[str, object] = {}

        def send() -> None:
            started = time.perf_counter()
            answer["response"] = stow(server, body, content_type)
            answer["seconds"] = time.perf_counter() - started

        sender = threading.Thread(target=send)
        sender.start()
        echo_times = []
        ae = AE(ae_title="ECHOER")
        ae.add_requested_context(Verification)
        while sender.is_alive() or not echo_times:
            started = time.perf_counter()
            assoc = ae.associate("127.0.0.1", scp.port, ae_title=config.scp.ae_title)
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
            echo_times.append(time.perf_counter() - started)
        sender.join()
    finally:
        scp.stop()
    response = answer["response"]
    assert response.status_code == 413 and "header line is longer than 8192 bytes" in response.json()["error"]
    assert answer["seconds"] < 2.0, answer["seconds"]
    assert max(echo_times) < 2.0, echo_times


# --- bounds ----------------------------------------------------------------------------------


def test_content_length_over_the_limit_is_refused_before_the_body(serve) -> None:
    config, server = serve(max_request_bytes=1 << 20)
    head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: multipart/related; type=\"application/dicom\"; boundary=x\r\n"
            f"Content-Length: {10 << 30}\r\n\r\n").encode()
    started = time.perf_counter()
    status, answer = raw_http(server, head, timeout=15)  # no byte of the 10 GiB body is sent
    assert status == 413 and b"over the limit of 1048576 bytes" in answer
    assert time.perf_counter() - started < 5
    assert [r.reject_reason for r in refusals_in(config)][0].startswith("HTTP 413: request body of 10737418240")


def test_body_size_part_size_and_part_count_limits(serve) -> None:
    config, server = serve(max_request_bytes=1 << 20)

    def chunked(body: bytes) -> Iterator[bytes]:  # no Content-Length: the limit must hold while streaming
        for offset in range(0, len(body), 8192):
            yield body[offset:offset + 8192]

    body, content_type = multipart([b"\0" * (600 << 10), b"\0" * (600 << 10)])
    too_big = httpx.post(server.url + "/dicom-web/studies", content=chunked(body),
                         headers={"Content-Type": content_type, **bearer()}, timeout=60)
    assert too_big.status_code == 413 and "over the limit of 1048576 bytes" in too_big.json()["error"]

    config, server = serve(max_part_bytes=1 << 16, max_parts=3)
    body, content_type = multipart([b"\0" * 1000, b"\0" * (100 << 10)])
    big_part = stow(server, body, content_type)
    assert big_part.status_code == 413 and big_part.json()["error"] == "part 2 is larger than 65536 bytes"

    good = encoded(radiograph())
    body, content_type = multipart([b"tiny"] * 3 + [good])
    many = stow(server, body, content_type)
    assert many.status_code == 413 and many.json()["error"] == "more than 3 parts in one request"

    assert jobs_in(config) == []  # a refused request stores nothing, not even its first parts
    assert uploads_left(config) == []
    reasons = [r.reject_reason for r in refusals_in(config)]
    assert len(reasons) == 3 and all(r.startswith("HTTP 413") for r in reasons)


def test_a_stalled_body_times_out(serve) -> None:
    config, server = serve(body_idle_timeout_s=1.0)
    head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: multipart/related; type=\"application/dicom\"; boundary=x\r\n"
            "Content-Length: 100000\r\n\r\n").encode()
    started = time.perf_counter()
    status, answer = raw_http(server, head, b"--x\r\nContent-Type: application/dicom\r\n\r\nDICM", timeout=20)
    assert status == 408 and b"nothing received for 1 s" in answer
    assert time.perf_counter() - started < 10
    assert refusals_in(config)[0].reject_reason.startswith("HTTP 408: request body stalled")
    assert uploads_left(config) == []


def test_concurrent_uploads_are_bounded(serve) -> None:
    config, server = serve(max_concurrent_uploads=1, body_idle_timeout_s=30.0)
    head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: multipart/related; type=\"application/dicom\"; boundary=x\r\n"
            "Content-Length: 100000\r\n\r\n--x\r\n").encode()
    body, content_type = multipart([encoded(radiograph())])
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as slow:
        slow.sendall(head)  # holds the one upload slot
        deadline = time.monotonic() + 15
        while (busy := stow(server, body, content_type)).status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert busy.status_code == 503 and busy.headers["retry-after"]
        assert "1 STOW-RS uploads are in progress" in busy.json()["error"]
    # The slot is free once the slow sender is gone.
    deadline = time.monotonic() + 15
    while (after := stow(server, body, content_type)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after.status_code == 200, after.text
    assert len(jobs_in(config)) == 1


def test_parts_are_streamed_to_disk_not_copied_in_memory(serve, tmp_path: Path) -> None:
    """Peak Python memory while a 24 MB instance is received stays a fraction of it (the
    header is read, the pixel data hashed from the file); the mmap-and-slice intake held two copies."""
    config, server = serve()
    ds = radiograph()
    ds.Rows = ds.Columns = 3500  # 24.5 MB of 16-bit pixels
    ds.PixelData = np.random.default_rng(1).integers(0, 4095, (3500, 3500), dtype=np.uint16).tobytes()
    instance = tmp_path / "big.dcm"
    ds.save_as(instance, enforce_file_format=True)
    del ds
    size = instance.stat().st_size
    boundary = "m3m0ry"
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head
        with open(instance, "rb") as fh:
            while chunk := fh.read(1 << 16):
                yield chunk
        yield tail

    warm_up, warm_up_type = multipart([encoded(radiograph())])  # first-use imports are not the upload's memory
    assert stow(server, warm_up, warm_up_type).status_code == 200
    tracemalloc.start()
    try:
        response = httpx.post(server.url + "/dicom-web/studies", content=body(), timeout=120,
                              headers={"Content-Type": f"multipart/related; type=\"application/dicom\"; boundary={boundary}",
                                       "Content-Length": str(len(head) + size + len(tail)), **bearer()})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 200, response.text
    assert peak < 0.25 * size, (peak, size)
    job = jobs_in(config)[-1]
    assert Path(job.spool_path).read_bytes() == instance.read_bytes()  # the sender's bytes, moved into the spool


# --- what real clients send ------------------------------------------------------------------


def test_meta_without_preamble_and_bare_data_sets(serve, caplog: pytest.LogCaptureFixture) -> None:
    config, server = serve()
    no_preamble = radiograph()
    in_memory = Dataset(no_preamble)  # as a client builds it: File Meta, no preamble
    in_memory.file_meta = no_preamble.file_meta
    bare, ct, unnamed = radiograph(), pydicom.dcmread(pydicom_file("CT_small.dcm")), radiograph()
    for ds in (bare, ct, unnamed):  # data sets alone: no preamble, no File Meta
        del ds.file_meta
        ds.preamble = None
    parts = [
        encoded(in_memory),
        encoded(bare, implicit_vr=False, little_endian=True),
        encoded(ct, implicit_vr=True, little_endian=True),
        encoded(unnamed, implicit_vr=False, little_endian=True),  # its transfer syntax not named
        b"\x02\x00\x02\x00UI\x04\x001.2\x00",  # a meta group without its transfer syntax
    ]
    assert not parts[0][128:132] == b"DICM" and parts[0][:2] == b"\x02\x00"
    types = ["application/dicom", f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}",
             f'application/dicom; transfer-syntax="{ImplicitVRLittleEndian}"', "application/dicom", "application/dicom"]
    body, content_type = multipart(parts, types)
    with caplog.at_level("WARNING", logger="node.http.stow"):
        response = stow(server, body, content_type)
    assert response.status_code == 202, response.text
    payload = response.json()
    assert len(payload[REFERENCED_SOP_SEQUENCE]["Value"]) == 3
    assert [f[FAILURE_REASON]["Value"] for f in payload[FAILED_SOP_SEQUENCE]["Value"]] == [[0xC000], [0xC000]]
    by_uid = {j.sop_instance_uid: j for j in jobs_in(config)}
    assert set(by_uid) == {no_preamble.SOPInstanceUID, bare.SOPInstanceUID, ct.SOPInstanceUID}
    assert by_uid[ct.SOPInstanceUID].status == "SKIPPED"
    for uid in (no_preamble.SOPInstanceUID, bare.SOPInstanceUID):
        spooled = pydicom.dcmread(by_uid[uid].spool_path)  # written as a proper Part 10 file
        assert spooled.preamble is not None and spooled.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert spooled.SOPInstanceUID == uid
    log = caplog.text
    assert "part 4 is not a DICOM Part 10 file (no DICM prefix at byte 128), has no File Meta group, " \
           "and its Content-Type names no transfer-syntax" in log
    assert "part 5: its File Meta group has no Transfer Syntax UID" in log


def test_dicomweb_client_stores_in_memory_datasets(serve) -> None:
    """dicomweb-client writes each part without preamble: 2 of these 3 were refused before."""
    from dicomweb_client.api import DICOMwebClient

    config, server = serve()
    from_file = radiograph()
    built = []
    for _ in range(2):
        ds = Dataset(radiograph())
        ds.file_meta = FileMetaDataset(from_file.file_meta)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        built.append(ds)
    client = DICOMwebClient(url=server.url + "/dicom-web", headers=bearer())
    result = client.store_instances([from_file, *built])
    stored = [item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence]
    assert stored == [from_file.SOPInstanceUID, *(ds.SOPInstanceUID for ds in built)]
    assert "FailedSOPSequence" not in result
    assert {j.sop_instance_uid for j in jobs_in(config)} == set(stored)


@pytest.mark.services
def test_orthanc_stow_client_with_the_intake_only_token(serve, orthanc: Orthanc) -> None:
    config, server = serve(stow_token=STOW_TOKEN)
    orthanc.request("PUT", "/dicom-web/servers/ptx", json.dumps(
        {"Url": server.url + "/dicom-web", "Username": "orthanc", "Password": STOW_TOKEN}).encode())
    resources = [orthanc.upload(pydicom_file("RG1_UNCR.dcm")), orthanc.upload(pydicom_file("CT_small.dcm"))]
    answer = orthanc.post_json("/dicom-web/servers/ptx/stow", {"Resources": resources, "Synchronous": True})
    assert int(answer["InstancesCount"]) == 2
    assert sorted(j.status for j in jobs_in(config)) == ["QUEUED", "SKIPPED"]
    assert all(j.source == "stow" and j.calling_ae == "orthanc" for j in jobs_in(config))


# --- tokens ----------------------------------------------------------------------------------


def test_stow_token_opens_intake_only(serve) -> None:
    config, server = serve(stow_token=STOW_TOKEN)
    body, content_type = multipart([encoded(radiograph())])
    assert stow(server, body, content_type, token=STOW_TOKEN).status_code == 200
    assert stow(server, body, content_type, token=TOKEN).status_code == 200  # the admin token opens everything
    for path in ("/jobs", "/associations", "/metrics", "/"):
        refused = httpx.get(server.url + path, headers=bearer(STOW_TOKEN))
        assert refused.status_code in (401, 403), path
        assert httpx.get(server.url + path, headers=bearer(TOKEN)).status_code == 200, path
    assert httpx.get(server.url + "/jobs", headers=bearer(STOW_TOKEN)).json()["error"] == \
        "the STOW-RS token opens STOW-RS intake only"
    # A PACS's HTTP Basic login with the STOW-RS token as password.
    assert stow(server, body, content_type, token="", auth=("pacs", STOW_TOKEN)).status_code == 200


def test_loopback_without_token_answers_only_its_own_host_name(serve) -> None:
    config, server = serve(token=None)
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "localhost", f"[::1]:{server.port}"):
        assert httpx.get(server.url + "/jobs", headers={"Host": host}).status_code == 200, host
    # A page on evil.example whose name now resolves to 127.0.0.1 (DNS rebinding).
    for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example"):
        rebound = httpx.get(server.url + "/jobs", headers={"Host": host})
        assert rebound.status_code == 403 and "Host header" in rebound.json()["error"], host
    body, content_type = multipart([encoded(radiograph())])
    rebound_stow = httpx.post(server.url + "/dicom-web/studies", content=body, timeout=60,
                              headers={"Content-Type": content_type, "Host": "evil.example"})
    assert rebound_stow.status_code == 403
    assert jobs_in(config) == []


@pytest.mark.parametrize(("value", "message"), [
    ("", "PTX_NODE_HTTP__TOKEN: http.token: is empty"),
    ("short-token", "PTX_NODE_HTTP__TOKEN: http.token: must be at least 16 characters"),
    (" padded-token-0123456789 ", "must be at least 16 characters without surrounding spaces"),
])
def test_weak_or_empty_tokens_are_configuration_errors(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, environ={"PTX_NODE_HTTP__TOKEN": value})
    with pytest.raises(ConfigError, match="stow_token must differ"):
        load_config(None, environ={}, overrides={"http": {"token": TOKEN, "stow_token": TOKEN}})


def test_config_check_refuses_an_empty_token_and_masks_real_ones(tmp_path: Path) -> None:
    import os

    config = tmp_path / "node.toml"
    config.write_text(f'spool_dir = "{tmp_path / "spool"}"\n[model]\nallow_untrained = true\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTX_NODE_")}

    def check(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "node.cli", "config", "check", str(config)],
                              capture_output=True, text=True, timeout=120, env={**env, **extra}, cwd=tmp_path)

    empty = check(PTX_NODE_HTTP__TOKEN="")
    assert empty.returncode != 0 and "http.token" in empty.stderr and "is empty" in empty.stderr
    assert empty.stdout == ""
    good = check(PTX_NODE_HTTP__TOKEN=TOKEN, PTX_NODE_HTTP__STOW_TOKEN=STOW_TOKEN)
    assert good.returncode == 0, good.stderr
    assert TOKEN not in good.stdout and STOW_TOKEN not in good.stdout
    http = json.loads(good.stdout)["http"]
    assert http["token"] == "***" and http["stow_token"] == "***"


# --- floods ----------------------------------------------------------------------------------


def test_rejected_stow_requests_are_counted_not_logged_one_row_each(serve) -> None:
    config, server = serve()
    body, content_type = multipart([b"x"])
    with httpx.Client() as client:
        for _ in range(40):
            assert client.post(server.url + "/dicom-web/studies", content=body, timeout=30,
                               headers={"Content-Type": content_type, **bearer("wrong-token-wrong-token")}
                               ).status_code == 401
        for _ in range(5):
            assert client.post(server.url + "/dicom-web/studies", content=b"x", timeout=30,
                               headers={"Content-Type": "application/json", **bearer()}).status_code == 415
    rows = refusals_in(config)
    # One row per peer, reason and minute: a run that crosses a minute boundary (CI did) has two.
    per_minute = [(r.reject_reason.split(":")[0], r.started_at.replace(second=0, microsecond=0)) for r in rows]
    assert len(per_minute) == len(set(per_minute)), per_minute
    assert len({minute for _, minute in per_minute}) <= 2, per_minute
    assert occurrences_by_reason(rows) == {"HTTP 401": 40, "HTTP 415": 5}
    listed = httpx.get(server.url + "/associations", params={"accepted": "false"}, headers=bearer()).json()
    assert sorted((a["id"], a["occurrences"]) for a in listed["associations"]) == [(r.id, r.occurrences) for r in rows]
    page = httpx.get(server.url + "/", headers=bearer()).text
    for row in rows:
        shown = re.search(rf'<tr id="association-{row.id}">.*?</tr>', page)
        assert shown, f"association {row.id} is not on the status page"
        assert (f"({row.occurrences} times)" in shown.group(0)) == (row.occurrences > 1), shown.group(0)


def occurrences_by_reason(rows: list[Association]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for row in rows:
        reason = row.reject_reason.split(":")[0]
        totals[reason] = totals.get(reason, 0) + row.occurrences
    return totals


def test_refused_associations_are_counted_not_logged_one_row_each(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config = config.model_copy(update={"scp": config.scp.model_copy(
        update={"allowed_callers": [AllowedCaller(ae_title="ORTHANC")]})})
    scp = StoreSCP(config, None)
    scp.start()
    try:
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(Verification)
        for _ in range(15):
            assoc = ae.associate("127.0.0.1", scp.port, ae_title=config.scp.ae_title)
            assert assoc.is_rejected
    finally:
        scp.stop()
    rows = refusals_in(config)
    assert 1 <= len(rows) <= 2, [(r.started_at, r.occurrences) for r in rows]  # two only across a minute boundary
    assert len({r.started_at.replace(second=0, microsecond=0) for r in rows}) == len(rows)
    assert all(r.protocol == "dimse" and r.calling_ae == "INTRUDER" for r in rows)
    assert sum(r.occurrences for r in rows) == 15


def test_refusal_rows_per_peer_and_minute_are_capped(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    now = dt.datetime(2026, 12, 1, 10, 15, 0)
    for index in range(20):
        record_refusal(config.database_url, protocol="stow", peer_address="10.0.0.9", peer_port=1000 + index,
                       calling_ae=None, called_ae=None, reason=f"HTTP 400: kind {index}", now=now)
    record_refusal(config.database_url, protocol="stow", peer_address="10.0.0.9", peer_port=1, calling_ae=None,
                   called_ae=None, reason="HTTP 400: kind 0", now=now.replace(minute=16))
    with get_sessionmaker(config.database_url)() as session:
        first_minute = session.execute(
            select(func.count(), func.sum(Association.occurrences)).where(Association.started_at < now.replace(minute=16))
        ).one()
        total = session.scalar(select(func.count()).select_from(Association))
    assert tuple(first_minute) == (MAX_ROWS_PER_PEER_MINUTE, 20)
    assert total == MAX_ROWS_PER_PEER_MINUTE + 1  # a new minute starts a new row

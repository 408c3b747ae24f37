"""The node end to end, with real peers on both ends.

Orthanc is the PACS: it routes images to the node through its REST API
(/modalities/{node}/store) and receives the SEG and SC back. dcmtk's storescu
is a second sender. Every SEG and SC that reaches Orthanc passes dciodvfy and
reads back with highdicom with its frame equal to the model's mask.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from node.db import Association, JobStatus
from tests.services import (
    NodeProcess,
    Orthanc,
    base_node_config,
    deid_file,
    make_phantom,
    pydicom_file,
    require_tool,
    wait_until,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
# Tests run the untrained network at a small input size: the path under test is the node's.
MODEL = {"allow_untrained": True, "device": "cpu", "tta": True, "untrained_input_size": 256}


def dciodvfy_errors(path: Path) -> list[str]:
    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    out = result.stdout + result.stderr
    return [line for line in out.splitlines() if line.startswith("Error")]


def node_for(tmp_path: Path, orthanc: Orthanc | None = None, **kwargs) -> NodeProcess:
    destinations = kwargs.pop("destinations", None)
    if destinations is None and orthanc is not None:
        destinations = [{"name": "orthanc", "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}]
    model = {**MODEL, **kwargs.pop("model", {})}
    config = base_node_config(tmp_path / "node", destinations=destinations, model=model, **kwargs)
    (tmp_path / "node").mkdir(exist_ok=True)
    return NodeProcess(tmp_path / "node", config)


def expected_mask(source_path: Path) -> np.ndarray:
    """The mask the node's model gives for this file, computed here independently."""
    from model import Segmenter

    segmenter = Segmenter.untrained(device="cpu", input_size=MODEL["untrained_input_size"], tta=True)
    return segmenter.predict(pydicom.dcmread(source_path), tta=True).mask


def outputs_in_orthanc(orthanc: Orthanc, study_uid: str) -> dict[str, list[str]]:
    """Orthanc instance ids in the study, by kind: SEG, SC, SOURCE."""
    found: dict[str, list[str]] = {"SEG": [], "SC": [], "SOURCE": []}
    for instance in orthanc.study_instances(study_uid):
        sop_class = orthanc.instance_tags(instance["ID"]).get("SOPClassUID")
        key = {SEG_SOP_CLASS: "SEG", SC_SOP_CLASS: "SC"}.get(sop_class, "SOURCE")
        found[key].append(instance["ID"])
    return found


def test_orthanc_routes_real_radiographs_and_gets_seg_and_sc_back(tmp_path: Path, orthanc: Orthanc) -> None:
    inputs = {
        "RG1_UNCR": pydicom_file("RG1_UNCR.dcm"),
        "RG1_J2KR": pydicom_file("RG1_J2KR.dcm"),
        "RG1_J2KI": pydicom_file("RG1_J2KI.dcm"),
        "cat": deid_file("animals/cat.dcm"),
        "CT": pydicom_file("CT_small.dcm"),
        "tiny CR": pydicom_file("dicomdirtests/77654033/CR1/6154"),
    }
    node = node_for(tmp_path, orthanc).start()
    try:
        orthanc.add_modality("ptx", node.ae_title, node.port)
        ids = {name: orthanc.upload(path) for name, path in inputs.items()}
        orthanc.store_to_modality("ptx", list(ids.values()))
        jobs = node.wait_for_terminal(len(inputs), timeout=600)
    finally:
        node.stop()

    log_text = node.log_text()
    for path in inputs.values():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for value in (str(ds.get("PatientName", "")), str(ds.get("PatientID", "")), str(ds.get("ReferringPhysicianName", ""))):
            if len(value) >= 3:
                assert value not in log_text, f"the node's log holds a header name/ID value: {value!r}"

    by_uid = {j.sop_instance_uid: j for j in jobs}
    for name, path in inputs.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        job = by_uid[str(ds.SOPInstanceUID)]
        if name in ("CT", "tiny CR"):
            assert job.status == JobStatus.SKIPPED, (name, job.status, job.error)
            assert job.error, f"{name}: SKIPPED without a reason"
            continue
        assert job.status == JobStatus.DONE, (name, job.status, job.error)
        assert job.calling_ae == "ORTHANC"
        assert job.started_at and job.finished_at and job.delivered_at
        assert job.model_name and job.untrained is True
        outputs = outputs_in_orthanc(orthanc, str(ds.StudyInstanceUID))
        # RG1_* share one study; count this job's own instances.
        seg_ids = [i for i in outputs["SEG"] if orthanc.instance_tags(i)["SOPInstanceUID"] == job.seg_sop_instance_uid]
        sc_ids = [i for i in outputs["SC"] if orthanc.instance_tags(i)["SOPInstanceUID"] == job.sc_sop_instance_uid]
        assert len(seg_ids) == 1 and len(sc_ids) == 1, (name, outputs)

        seg_path = tmp_path / f"{name}-seg.dcm"
        seg_path.write_bytes(orthanc.instance_file(seg_ids[0]))
        sc_path = tmp_path / f"{name}-sc.dcm"
        sc_path.write_bytes(orthanc.instance_file(sc_ids[0]))
        for out in (seg_path, sc_path):
            errors = dciodvfy_errors(out)
            assert not errors, f"{name} {out.name}: dciodvfy errors:\n" + "\n".join(errors)

        seg = hd.seg.segread(seg_path)
        assert seg.StudyInstanceUID == ds.StudyInstanceUID
        assert seg.SeriesInstanceUID != ds.SeriesInstanceUID
        frame = seg.get_segment_mask(1) if hasattr(seg, "get_segment_mask") else None
        if frame is None:
            frame = seg.pixel_array
        frame = np.asarray(frame).reshape(int(ds.Rows), int(ds.Columns)).astype(bool)
        assert frame.shape == (int(ds.Rows), int(ds.Columns))
        mask = expected_mask(path)
        mismatch = int(np.count_nonzero(frame != mask))
        assert mismatch == 0, f"{name}: SEG frame differs from the model's mask in {mismatch} pixels"
        referenced = [r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence]
        assert str(ds.SOPInstanceUID) in referenced

        sc = pydicom.dcmread(sc_path)
        assert sc.StudyInstanceUID == ds.StudyInstanceUID
        assert sc.SamplesPerPixel == 3
        assert "NOT FOR DIAGNOSTIC USE" in str(sc.get("SeriesDescription", "")) + str(sc.get("ImageComments", ""))


def test_storescu_sender_and_calling_ae_allow_list(tmp_path: Path, orthanc: Orthanc) -> None:
    storescu = require_tool("storescu")
    phantom = make_phantom(tmp_path / "phantom.dcm")
    allowed = [{"ae_title": "GOODSCU"}, {"ae_title": "PINNED", "host": "10.1.2.3"}]
    node = node_for(tmp_path, orthanc, scp={"allowed_callers": allowed}).start()
    try:
        ok = subprocess.run([storescu, "-aet", "GOODSCU", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                             str(phantom)], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        bad = subprocess.run([storescu, "-aet", "INTRUDER", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                              str(phantom)], capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0, "a caller not on the allow-list was accepted"
        assert "reject" in (bad.stdout + bad.stderr).lower()
        # Allowed title, wrong host: aborted right after the association is accepted.
        pinned = subprocess.run([storescu, "-aet", "PINNED", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                                 str(phantom)], capture_output=True, text=True, timeout=60)
        assert pinned.returncode != 0, "a pinned caller from the wrong host was accepted"
        jobs = node.wait_for_terminal(1, timeout=300)
        with node.session() as session:
            associations = list(session.scalars(select(Association).order_by(Association.id)))
    finally:
        node.stop()
    assert [j.status for j in jobs] == [JobStatus.DONE]
    assert jobs[0].calling_ae == "GOODSCU"
    refused = [a for a in associations if not a.accepted]
    assert [a.calling_ae for a in refused] == ["INTRUDER", "PINNED"]
    assert all(a.reject_reason for a in refused) and "127.0.0.1" in refused[1].reject_reason
    assert any(a.accepted and a.calling_ae == "GOODSCU" and a.instances_accepted == 1 for a in associations)


def test_same_instance_twice_makes_one_job_unless_pixels_differ(tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    first = make_phantom(tmp_path / "a.dcm", seed=3)
    ds = pydicom.dcmread(first)
    changed = tmp_path / "b.dcm"
    arr = ds.pixel_array.copy()
    arr[:10, :10] = 0
    ds.PixelData = arr.tobytes()
    ds.save_as(changed)
    node = node_for(tmp_path, None, destinations=[]).start()
    try:
        for path in (first, first, changed):
            run = subprocess.run([storescu, "-aec", node.ae_title, "127.0.0.1", str(node.port), str(path)],
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, run.stderr
        jobs = node.wait_for_terminal(2, timeout=300)
    finally:
        node.stop()
    assert len(jobs) == 2, [(j.id, j.status) for j in jobs]
    assert jobs[0].sop_instance_uid == jobs[1].sop_instance_uid
    assert jobs[0].pixel_sha256 != jobs[1].pixel_sha256
    assert all(j.status == JobStatus.DONE for j in jobs)
    # No destination: outputs are written, nothing is delivered.
    assert all(j.delivered_at is None and j.seg_sop_instance_uid for j in jobs)


def test_production_mode_postgres_and_redis(tmp_path: Path, orthanc: Orthanc, postgres_url: str, redis_url: str) -> None:
    node = node_for(tmp_path, orthanc, database_url=postgres_url, broker_url=redis_url).start()
    try:
        orthanc.add_modality("ptx", node.ae_title, node.port)
        ids = [orthanc.upload(make_phantom(tmp_path / f"p{i}.dcm", seed=10 + i)) for i in range(2)]
        orthanc.store_to_modality("ptx", ids)
        jobs = node.wait_for_terminal(2, timeout=300)
    finally:
        node.stop()
    assert [j.status for j in jobs] == [JobStatus.DONE, JobStatus.DONE], [(j.status, j.error) for j in jobs]
    for job in jobs:
        outputs = outputs_in_orthanc(orthanc, job.study_instance_uid)
        assert len(outputs["SEG"]) == 1 and len(outputs["SC"]) == 1


def _parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_worker_killed_mid_job_still_delivers_exactly_once(tmp_path: Path, orthanc: Orthanc) -> None:
    # A large input makes the job long enough to kill it in the middle.
    node = node_for(tmp_path, orthanc, model={"untrained_input_size": 512}).start()
    try:
        orthanc.add_modality("ptx", node.ae_title, node.port)
        source = deid_file("animals/cat.dcm")
        orthanc.store_to_modality("ptx", [orthanc.upload(source)])

        def running_job():
            jobs = node.jobs()
            return jobs[0] if jobs and jobs[0].status == JobStatus.RUNNING and jobs[0].worker else None

        job = wait_until(running_job, 120, interval=0.05, what="the job to be RUNNING")
        child = int(job.worker.rsplit(":", 1)[1])
        parent = _parent_pid(child)
        for pid in (child, parent):
            os.kill(pid, signal.SIGKILL)
        jobs = node.wait_for_terminal(1, timeout=300)
    finally:
        node.stop()
    job = jobs[0]
    assert job.status == JobStatus.DONE, (job.status, job.error)
    assert job.attempts >= 2, "the job was not run again after the kill"
    outputs = outputs_in_orthanc(orthanc, job.study_instance_uid)
    assert len(outputs["SEG"]) == 1 and len(outputs["SC"]) == 1, outputs


def _start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    server = require_tool("redis-server")
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    wait_until(lambda: _redis_ping(redis.Redis(port=port)), 20, what="redis-server")
    return proc


def _redis_ping(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def test_broker_down_while_images_arrive_nothing_lost(tmp_path: Path, orthanc: Orthanc) -> None:
    from tests.services import free_port

    storescu = require_tool("storescu")
    port = free_port()
    redis_proc = _start_redis(port, tmp_path)
    node = node_for(tmp_path, orthanc, broker_url=f"redis://127.0.0.1:{port}/0").start()
    try:
        redis_proc.kill()
        redis_proc.wait()
        phantoms = [make_phantom(tmp_path / f"b{i}.dcm", seed=20 + i) for i in range(2)]
        for path in phantoms:
            run = subprocess.run([storescu, "-aec", node.ae_title, "127.0.0.1", str(node.port), str(path)],
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, f"C-STORE failed while the broker was down: {run.stderr}"
        jobs = node.jobs()
        assert len(jobs) == 2 and all(j.status in (JobStatus.RECEIVED, JobStatus.QUEUED) for j in jobs)
        redis_proc = _start_redis(port, tmp_path)
        jobs = node.wait_for_terminal(2, timeout=300)
    finally:
        node.stop()
        redis_proc.kill()
    assert [j.status for j in jobs] == [JobStatus.DONE, JobStatus.DONE], [(j.status, j.error) for j in jobs]
    for job in jobs:
        outputs = outputs_in_orthanc(orthanc, job.study_instance_uid)
        assert len(outputs["SEG"]) == 1 and len(outputs["SC"]) == 1


def test_destination_down_retries_then_delivers_or_fails_with_reason(tmp_path: Path, orthanc: Orthanc) -> None:
    storescu = require_tool("storescu")
    node = node_for(tmp_path, orthanc, delivery={"max_attempts": 4, "backoff_initial_s": 1.0, "backoff_max_s": 2.0}).start()
    try:
        orthanc.stop()  # the PACS goes down
        first = make_phantom(tmp_path / "d1.dcm", seed=31)
        run = subprocess.run([storescu, "-aec", node.ae_title, "127.0.0.1", str(node.port), str(first)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        # Let it fail at least once, then bring the PACS back before the retries run out.
        wait_until(lambda: any(d.attempts >= 1 for j in node.jobs() for d in _deliveries(node, j.id)), 120,
                   what="a failed delivery attempt")
        orthanc.start()
        jobs = node.wait_for_terminal(1, timeout=300)
        assert jobs[0].status == JobStatus.DONE, (jobs[0].status, jobs[0].error)

        # Down for longer than the retries last: FAILED with the reason, and `resend` works later.
        orthanc.stop()
        second = make_phantom(tmp_path / "d2.dcm", seed=32)
        run = subprocess.run([storescu, "-aec", node.ae_title, "127.0.0.1", str(node.port), str(second)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0
        jobs = node.wait_for_terminal(2, timeout=300)
        failed = jobs[1]
        assert failed.status == JobStatus.FAILED
        assert "after 4 attempts" in failed.error and "orthanc" in failed.error
        orthanc.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PTX_NODE_")}
        resend = subprocess.run([sys.executable, "-m", "node.cli", "resend", str(failed.id), "--config", str(node.config_path)],
                                capture_output=True, text=True, timeout=60, env=env)
        assert resend.returncode == 0, resend.stderr
        jobs = node.wait_for_terminal(2, timeout=300)
        assert jobs[1].status == JobStatus.DONE, (jobs[1].status, jobs[1].error)
    finally:
        node.stop()
    for job in jobs:
        outputs = outputs_in_orthanc(orthanc, job.study_instance_uid)
        assert len(outputs["SEG"]) == 1 and len(outputs["SC"]) == 1, outputs


def _deliveries(node: NodeProcess, job_id: int):
    from node.db import Delivery

    with node.session() as session:
        return list(session.scalars(select(Delivery).where(Delivery.job_id == job_id)))


def test_orthanc_autoroutes_with_the_readme_lua_rule(tmp_path: Path) -> None:
    """The routing rule the README gives PACS admins, run by a real Orthanc."""
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    lua = re.search(r"```lua\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "autoroute.lua").write_text(lua)
    node = node_for(tmp_path, None, destinations=[])
    pacs = Orthanc(tmp_path / "orthanc")
    pacs.extra_config = {
        "LuaScripts": [str(tmp_path / "autoroute.lua")],
        "DicomModalities": {"ptx": [node.ae_title, "127.0.0.1", node.port]},
    }
    pacs.start()
    node.config["destinations"] = [{"name": "orthanc", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                                    "port": pacs.dicom_port}]
    from node.config import write_config_file

    write_config_file(node.config_path, node.config)
    node.start()
    try:
        pacs.upload(make_phantom(tmp_path / "auto.dcm", seed=41))  # a CR: routed
        pacs.upload(pydicom_file("CT_small.dcm"))  # a CT: not routed
        (job,) = node.wait_for_terminal(1, timeout=300)
        outputs = wait_until(
            lambda: (o := outputs_in_orthanc(pacs, job.study_instance_uid)) and o["SEG"] and o["SC"] and o,
            60, what="SEG and SC back in Orthanc")
    finally:
        node.stop()
        pacs.stop()
    assert job.status == JobStatus.DONE and job.calling_ae == "ORTHANC"
    assert len(node.jobs()) == 1, "the CT or the node's own outputs were routed too"
    assert len(outputs["SEG"]) == 1 and len(outputs["SC"]) == 1

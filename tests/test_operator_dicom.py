"""What the association log and the delivery errors tell an admin (issue 14): the called AE
title as the peer sent it, the optional called-title check (Orthanc's DicomCheckCalledAet),
a host-pin mismatch in words, a closed destination port as "connection refused"."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from node.config import load_config
from node.db import Association
from node.delivery import DeliveryError, send_dimse
from node.demo.pacs import free_port, wait_until
from tests.services import NodeProcess, base_node_config, pydicom_file, require_tool


def _echo(node: NodeProcess, *, calling: str, called: str) -> subprocess.CompletedProcess[str]:
    echoscu = require_tool("echoscu")
    return subprocess.run([echoscu, "-aet", calling, "-aec", called, "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, timeout=60)


def _associations(node: NodeProcess, count: int) -> list[Association]:
    def rows() -> list[Association] | None:
        with node.session() as session:
            found = list(session.scalars(select(Association).order_by(Association.id)))
        return found if len(found) >= count else None

    return wait_until(rows, 30, what=f"{count} association row(s)")


@pytest.mark.parametrize("check_called", [False, True], ids=["default", "check_called_ae_title"])
def test_called_ae_title_is_logged_as_called_and_checked_on_request(tmp_path: Path, check_called: bool) -> None:
    config = base_node_config(tmp_path, worker={"embedded_workers": 0},
                              scp={"allowed_callers": [{"ae_title": "ORTHANC", "host": "10.0.0.5"},
                                                       {"ae_title": "MODALITY"}],
                                   "check_called_ae_title": check_called})
    node = NodeProcess(tmp_path, config).start()
    try:
        wrong = _echo(node, calling="MODALITY", called="WRONG")
        pinned = _echo(node, calling="ORTHANC", called="PTXNODE")
        assert "Echo Failed" in pinned.stderr  # aborted: wrong host
        (to_wrong, from_pinned) = _associations(node, 2)
    finally:
        node.stop()
    assert to_wrong.called_ae == "WRONG"  # not the node's own title
    if check_called:
        assert wrong.returncode != 0
        assert not to_wrong.accepted
        assert "called AE title is not PTXNODE; scp.check_called_ae_title is on" in to_wrong.reject_reason
    else:
        assert wrong.returncode == 0, wrong.stderr
        assert to_wrong.accepted
    assert not from_pinned.accepted
    assert from_pinned.reject_reason == "ORTHANC is allowed only from 10.0.0.5, not from 127.0.0.1"


def test_a_closed_destination_port_says_connection_refused(tmp_path: Path) -> None:
    closed = free_port()
    config = load_config(None, environ={}, overrides={
        "destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": closed}]})
    path = tmp_path / "x.dcm"
    pydicom.dcmread(pydicom_file("CT_small.dcm")).save_as(path)
    with pytest.raises(DeliveryError) as failure:
        send_dimse(config.destinations[0], [path], calling_ae_title="PTXNODE", timeout_s=5)
    assert "connection refused" in str(failure.value)
    assert "(aborted)" not in str(failure.value)


def test_start_up_and_job_log_carry_no_library_noise(tmp_path: Path) -> None:
    """No alembic plugin lines, no highdicom person-name warning per SC, no Celery banner or
    multi-line root warning: what is left is the node's own lines."""
    source = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm"))
    source.PatientName = "Anonymized"  # one component: highdicom warns on every SC built from it
    path = tmp_path / "in.dcm"
    source.save_as(path)
    workdir = tmp_path / "node"
    workdir.mkdir()
    node = NodeProcess(workdir, base_node_config(workdir)).start()
    try:
        storescu = require_tool("storescu")
        sent = subprocess.run([storescu, "-aec", node.ae_title, "127.0.0.1", str(node.port), str(path)],
                              capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        (job,) = node.wait_for_terminal(1, timeout=600)
    finally:
        node.stop()
    assert job.status == "DONE", job.error
    log = node.log_text()
    assert "database schema at revision" in log
    for noise in ("alembic.runtime.plugins", "setup plugin", "unlikely to represent the intended person name",
                  "superuser privileges", "[queues]", "Traceback"):
        assert noise not in log, noise
    assert log.count("worker runs as root") <= 1  # said once, in one line, when running as root

"""deploy/README.md walked through as an admin would, from a clean directory, in production
mode (issue 14): the shipped deploy/node.toml with the machine's values in `PTX_NODE_*`
variables (the systemd env file's keys), a PostgreSQL database created by the test, Redis on
the test's own database number, `ptx-node db upgrade`, `ptx-node serve`, separate
`ptx-node worker` processes, Orthanc as the PACS routing an image to the node.

A worker started with an impossible device (the README's `--device cuda` on a machine
without CUDA) exits non-zero within 30 s without taking the job, which waits QUEUED; a
worker that can serve then processes it, SEG and SC land in Orthanc, and `ptx-node jobs`
and the status page show the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from node.db import Job, JobStatus, get_sessionmaker
from node.demo.pacs import free_port, wait_until
from node.proc import die_with_parent
from tests.services import Orthanc, pydicom_file

pytestmark = [pytest.mark.slow]

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
TOKEN = "walkthrough-token-0123456789"


@pytest.fixture(scope="module")
def always_positive_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real trainer checkpoint whose threshold calls every image positive, so a SEG is written."""
    from trainer.testing import train_tiny_checkpoint

    trained = train_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), n_images=8, steps=2)
    checkpoint = tmp_path_factory.mktemp("models") / "ptx-unetpp-b4"
    shutil.copytree(trained, checkpoint)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["postprocess"].update({"mode": "threshold", "threshold": 0.0, "min_area_px": 0})
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    return checkpoint


class Admin:
    """Runs `ptx-node` in the site directory with the environment file's variables."""

    def __init__(self, site: Path, env: dict[str, str]) -> None:
        self.site = site
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("PTX_NODE_")}, **env,
                    "PYTHONUNBUFFERED": "1"}
        self.procs: list[subprocess.Popen[str]] = []

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "node.cli", *args], cwd=self.site, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self, name: str, *args: str) -> subprocess.Popen[str]:
        log = open(self.site / f"{name}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", *args], cwd=self.site, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=die_with_parent)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.site / f"{name}.log").read_text()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_deploy_readme_in_production_mode(tmp_path: Path, postgres_url: str, redis_url: str,
                                         always_positive_checkpoint: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the README's `--device cuda` worker is not impossible here")
    orthanc = Orthanc(tmp_path / "orthanc").start()
    site = tmp_path / "etc-ptx-node"  # the clean directory: what `install` puts in /etc/ptx-node
    site.mkdir()
    shutil.copyfile(DEPLOY / "node.toml", site / "node.toml")
    scp_port, http_port = free_port(), free_port()
    env = {
        # deploy/systemd/env.example's keys, with this machine's values ...
        "PTX_NODE_DATABASE_URL": postgres_url,
        "PTX_NODE_BROKER_URL": redis_url,
        "PTX_NODE_HTTP__TOKEN": TOKEN,
        # ... and the site's own: paths, ports, the PACS (lists as JSON).
        "PTX_NODE_SPOOL_DIR": str(tmp_path / "var-lib-ptx-node" / "spool"),
        "PTX_NODE_MODEL__CHECKPOINT": str(always_positive_checkpoint),
        "PTX_NODE_SCP__BIND_ADDRESS": "127.0.0.1",
        "PTX_NODE_SCP__PORT": str(scp_port),
        "PTX_NODE_HTTP__BIND_ADDRESS": "127.0.0.1",
        "PTX_NODE_HTTP__PORT": str(http_port),
        "PTX_NODE_SCP__ALLOWED_CALLERS": json.dumps([{"ae_title": orthanc.ae_title, "host": "127.0.0.1"}]),
        "PTX_NODE_DESTINATIONS": json.dumps([{"name": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                                              "port": orthanc.dicom_port}]),
        "PTX_NODE_DELIVERY__BACKOFF_INITIAL_S": "1",
    }
    env_file_keys = set(re.findall(r"^(PTX_NODE_[A-Z_]+)=", (DEPLOY / "systemd" / "env.example").read_text(), re.M))
    assert env_file_keys and env_file_keys <= set(env), env_file_keys - set(env)
    admin = Admin(site, env)
    try:
        checked = admin.run("config", "check", "node.toml")
        assert checked.returncode == 0, checked.stderr
        upgraded = admin.run("db", "upgrade", "-c", "node.toml")  # what ptx-node.service runs first
        assert upgraded.returncode == 0 and "created the schema" in upgraded.stdout, upgraded.stderr

        node = admin.start("node", "serve", "-c", "node.toml")
        wait_until(lambda: node.poll() is None and "ptx-node ready" in admin.log("node"), 180,
                   what="ptx-node serve to be ready")

        orthanc.add_modality("ptx", "PTXNODE", scp_port)
        source = pydicom_file("RG1_UNCR.dcm")
        orthanc.store_to_modality("ptx", [orthanc.upload(source)])
        factory = get_sessionmaker(postgres_url)

        def the_job() -> Job | None:
            with factory() as session:
                return session.query(Job).one_or_none()

        wait_until(lambda: (job := the_job()) is not None and job.status == JobStatus.QUEUED, 120,
                   what="the routed image to be QUEUED")

        # The README's worker command, on a machine without CUDA.
        started = time.monotonic()
        impossible = admin.start("worker-cuda", "worker", "--config", "node.toml", "--device", "cuda")
        code = impossible.wait(timeout=120)
        elapsed = time.monotonic() - started
        assert code != 0
        assert elapsed < 30, f"the impossible worker took {elapsed:.0f} s to give up"
        reason = [line for line in admin.log("worker-cuda").splitlines() if "cannot serve" in line]
        assert len(reason) == 1 and "CUDA is not available" in reason[0], admin.log("worker-cuda")
        time.sleep(3)
        job = the_job()
        assert job.status == JobStatus.QUEUED and job.attempts == 0 and job.worker is None
        listing = admin.run("jobs", "-c", "node.toml")
        assert re.search(rf"^{job.id}\s+QUEUED\b", listing.stdout, re.M), listing.stdout
        status_page = httpx.get(f"http://127.0.0.1:{http_port}/", headers={"Authorization": f"Bearer {TOKEN}"},
                                timeout=30).text
        assert "No worker can serve" in status_page and "CUDA is not available" in status_page

        admin.start("worker-cpu", "worker", "--config", "node.toml", "--device", "cpu")
        wait_until(lambda: the_job().status in (JobStatus.DONE, JobStatus.FAILED), 600,
                   what="a good worker to process the waiting job")
        job = the_job()
        assert job.status == JobStatus.DONE, (job.error, admin.log("worker-cpu")[-3000:])
        assert job.attempts == 1 and job.seg_sop_instance_uid and job.sc_sop_instance_uid

        stored = {orthanc.instance_tags(i["ID"])["SOPInstanceUID"]
                  for i in orthanc.study_instances(job.study_instance_uid)}
        assert {job.seg_sop_instance_uid, job.sc_sop_instance_uid} <= stored

        done = admin.run("jobs", "-c", "node.toml")
        assert done.stdout.splitlines()[0].startswith("database: postgresql+psycopg://")
        assert re.search(rf"^{job.id}\s+DONE\b.*\bPTX\b", done.stdout, re.M), done.stdout
        page = httpx.get(f"http://127.0.0.1:{http_port}/", headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=30).text
        assert f'id="job-{job.id}" data-status="DONE"' in page
        assert "No worker can serve" not in page
        workers = admin.run("workers", "-c", "node.toml")
        assert "same as node" in workers.stdout and "cannot serve: model.device is cuda" in workers.stdout
    finally:
        admin.stop_all()
        orthanc.stop()

"""The node serving a checkpoint the trainer wrote: trainer -> model format -> node.

A two-step CPU training run on synthetic phantoms writes a real checkpoint; the node
loads it (hash verified), records its identity on every job and in the SEG's
algorithm identification, and follows the negative-result policy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from node.db import JobStatus
from tests.services import NodeProcess, base_node_config, require_tool

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.testing import train_tiny_checkpoint

    return train_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), n_images=8, steps=2)


def _phantoms(folder: Path, count: int) -> list[Path]:
    from trainer.synth import make_phantom, write_dicom

    rng = np.random.default_rng(5)
    folder.mkdir(parents=True, exist_ok=True)
    return [write_dicom(folder / f"p{i}.dcm", make_phantom(rng, 384)[0]) for i in range(count)]


def _send(node: NodeProcess, paths: list[Path]) -> None:
    storescu = require_tool("storescu")
    run = subprocess.run([storescu, "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, paths)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_node_serves_a_trainer_checkpoint(tmp_path: Path, trained_checkpoint: Path) -> None:
    from model.checkpoint import read_manifest

    manifest = read_manifest(trained_checkpoint)
    workdir = tmp_path / "node"
    workdir.mkdir()
    config = base_node_config(workdir, checkpoint=trained_checkpoint,
                              outputs={"negative": ["seg", "sc"]})
    node = NodeProcess(workdir, config).start()
    try:
        _send(node, _phantoms(tmp_path / "in", 2))
        jobs = node.wait_for_terminal(2, timeout=300)
    finally:
        node.stop()
    for job in jobs:
        assert job.status == JobStatus.DONE, (job.status, job.error)
        assert job.untrained is False
        assert job.checkpoint_sha256 == manifest.weights_sha256
        assert job.model_name == manifest.name and job.model_version == manifest.version
        seg = hd.seg.segread(Path(job.output_dir) / "seg.dcm")
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert manifest.weights_sha256[:12] in str(algorithm.AlgorithmVersion)
        assert "UNTRAINED" not in seg.SeriesDescription


def test_node_serves_a_fold_ensemble(tmp_path: Path, trained_checkpoint: Path) -> None:
    """An ensemble of two members (the trained one and a perturbed copy): the jobs and every
    output name it as an ensemble, with its one digest, within the 64-character LO."""
    import torch
    from safetensors.torch import load_file

    from model.checkpoint import read_manifest, save_checkpoint, save_ensemble
    from model.network import build_network
    from tests.outputs_helpers import dciodvfy_errors

    manifest = read_manifest(trained_checkpoint)
    other = build_network(manifest.architecture, manifest.encoder, decoder_channels=manifest.decoder_channels)
    state = load_file(str(trained_checkpoint / "weights.safetensors"))
    generator = torch.Generator().manual_seed(3)
    other.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                           for k, v in state.items()})
    member = save_checkpoint(tmp_path / "member", other, manifest)
    ensemble = save_ensemble(tmp_path / "ensemble", {0: trained_checkpoint, 1: member}, manifest,
                             postprocess_tuned_on="the first member's validation search (test)")
    ensemble_manifest = read_manifest(ensemble)
    workdir = tmp_path / "node"
    workdir.mkdir()
    config = base_node_config(workdir, checkpoint=ensemble, outputs={"negative": ["seg", "sc"]})
    node = NodeProcess(workdir, config).start()
    try:
        _send(node, _phantoms(tmp_path / "in", 1))
        (job,) = node.wait_for_terminal(1, timeout=300)
    finally:
        node.stop()
    assert job.status == JobStatus.DONE, (job.status, job.error)
    assert job.checkpoint_sha256 == ensemble_manifest.weights_sha256 != manifest.weights_sha256
    assert job.model_version == f"{manifest.version} 2-fold ensemble"
    seg_path = Path(job.output_dir) / "seg.dcm"
    seg = hd.seg.segread(seg_path)
    version = str(seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion)
    assert version == f"{manifest.version} 2-fold ensemble sha256:{ensemble_manifest.weights_sha256[:12]}"
    for path in (seg_path, Path(job.output_dir) / "sr.dcm"):
        errors, output = dciodvfy_errors(path)
        assert not errors, output


def test_negative_results_get_the_sr_and_overlay_by_default(tmp_path: Path, trained_checkpoint: Path) -> None:
    # The same weights with a threshold no probability reaches: every image is negative.
    strict = tmp_path / "strict-checkpoint"
    shutil.copytree(trained_checkpoint, strict)
    manifest_path = strict / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["postprocess"].update({"mode": "threshold", "threshold": 0.999999})
    manifest_path.write_text(json.dumps(manifest))
    workdir = tmp_path / "node"
    workdir.mkdir()
    node = NodeProcess(workdir, base_node_config(workdir, checkpoint=strict)).start()
    try:
        _send(node, _phantoms(tmp_path / "in", 1))
        (job,) = node.wait_for_terminal(1, timeout=300)
    finally:
        node.stop()
    assert job.status == JobStatus.DONE, job.error
    assert job.positive is False and job.area_px == 0
    assert job.seg_sop_instance_uid is None and not (Path(job.output_dir) / "seg.dcm").exists()
    assert job.sc_sop_instance_uid and (Path(job.output_dir) / "sc.dcm").exists()
    assert job.sr_sop_instance_uid and (Path(job.output_dir) / "sr.dcm").exists()
    assert job.gsps_sop_instance_uid is None and not (Path(job.output_dir) / "gsps.dcm").exists()


def test_a_worker_that_cannot_load_its_model_never_takes_a_job(tmp_path: Path, trained_checkpoint: Path) -> None:
    """Issue 14: a tampered checkpoint makes the embedded worker exit non-zero at start with
    one line; `serve` restarts it with a growing delay; the image waits QUEUED (it does not
    fail) while the status page and /metrics say no worker can serve and why; once the
    checkpoint is repaired the next restart serves the waiting job."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from model.checkpoint import read_manifest
    from node.demo.pacs import free_port, wait_until

    broken = tmp_path / "broken-checkpoint"
    shutil.copytree(trained_checkpoint, broken)
    weights = broken / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    workdir = tmp_path / "node"
    workdir.mkdir()
    token = "checkpoint-test-token"
    config = base_node_config(workdir, checkpoint=broken, worker={"max_attempts": 1},
                              http={"enabled": True, "port": free_port(), "token": token})
    node = NodeProcess(workdir, config).start()
    headers = {"Authorization": f"Bearer {token}"}
    base = f"http://127.0.0.1:{config['http']['port']}"
    try:
        _send(node, _phantoms(tmp_path / "in", 1))
        # Two failed starts, the second restart delay longer than the first.
        wait_until(lambda: "restarting in 4 s" in node.log_text(), 240, what="a second, slower worker restart")
        log = node.log_text()
        assert "exited with status 3" in log and "restarting in 2 s" in log
        reasons = [line for line in log.splitlines() if line.startswith("ptx-node worker: cannot serve")]
        assert reasons and all("sha256" in line for line in reasons), reasons
        assert "Traceback" not in log
        (job,) = node.jobs()
        assert job.status in (JobStatus.QUEUED, JobStatus.RECEIVED) and job.attempts == 0, (job.status, job.error)
        assert job.worker is None  # no worker ever claimed it

        page = httpx.get(base + "/", headers=headers, timeout=30).text
        assert "id=cannot-serve" in page and "No worker can serve" in page and "sha256" in page
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(httpx.get(base + "/metrics", headers=headers,
                                                                          timeout=30).text)
                   for s in family.samples}
        assert samples[("ptx_workers_serving", ())] == 0
        assert samples[("ptx_workers_unable_to_serve", (("reason", "checkpoint_invalid"),))] >= 1
        assert samples[("ptx_worker_start_failures_total", (("reason", "checkpoint_invalid"),))] >= 2
        assert samples[("ptx_queue_depth", ())] == 1

        # The admin restores the weights; the supervisor's next restart serves the queue.
        shutil.copyfile(trained_checkpoint / "weights.safetensors", weights)
        (done,) = node.wait_for_terminal(1, timeout=300)
    finally:
        node.stop()
    assert done.status == JobStatus.DONE, done.error
    assert done.checkpoint_sha256 == read_manifest(trained_checkpoint).weights_sha256
    assert Path(done.spool_path).exists()

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
                              outputs={"negative_policy": "seg_and_sc"})
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


def test_negative_results_get_only_the_overlay_by_default(tmp_path: Path, trained_checkpoint: Path) -> None:
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


def test_a_tampered_checkpoint_stops_the_worker_not_the_node(tmp_path: Path, trained_checkpoint: Path) -> None:
    broken = tmp_path / "broken-checkpoint"
    shutil.copytree(trained_checkpoint, broken)
    weights = broken / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    workdir = tmp_path / "node"
    workdir.mkdir()
    node = NodeProcess(workdir, base_node_config(workdir, checkpoint=broken, worker={"max_attempts": 1})).start()
    try:
        _send(node, _phantoms(tmp_path / "in", 1))
        (job,) = node.wait_for_terminal(1, timeout=300)
    finally:
        node.stop()
    # The image is kept and the job says why it failed.
    assert job.status == JobStatus.FAILED
    assert "sha256" in job.error.lower() or "hash" in job.error.lower(), job.error
    assert Path(job.spool_path).exists()

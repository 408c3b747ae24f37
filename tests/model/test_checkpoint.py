"""Checkpoint format: round trip, hash pinning, unknown manifests refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import (
    MANIFEST_FILENAME,
    WEIGHTS_FILENAME,
    CheckpointError,
    Manifest,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from model.infer import Segmenter
from model.network import build_network
from model.postprocess import PostprocessConfig
from model.preprocess import PreprocessConfig, SourceImage


def _manifest(**overrides) -> Manifest:
    values = dict(
        name="ptx-test",
        version="1.2.0",
        architecture="unet",
        encoder="efficientnet-b0",
        input_size=64,
        preprocess=PreprocessConfig(input_size=64, lung_crop=True).to_dict(),
        postprocess=PostprocessConfig(mode="triplet", top_min_area_px=0).to_dict(),
        tta=["hflip"],
        training_data={"dataset": "synthetic"},
        metrics={"dice": 0.5},
    )
    values.update(overrides)
    return Manifest(**values)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(1)
    network = build_network("unet", "efficientnet-b0")
    with torch.no_grad():  # non-trivial batch-norm statistics must survive too
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    assert save_checkpoint(directory, network, _manifest()) == directory
    return directory, network


def test_files_and_manifest(saved) -> None:
    directory, _ = saved
    assert (directory / WEIGHTS_FILENAME).is_file()
    data = json.loads((directory / MANIFEST_FILENAME).read_text())
    assert data["format_version"] == 1
    assert len(data["weights_sha256"]) == 64
    assert data["preprocess"]["lung_crop"] is True and data["preprocess"]["crop_pad_px"] == 20
    assert data["postprocess"]["mode"] == "triplet"
    assert data["created"]
    manifest = read_manifest(directory)
    assert manifest.metrics == {"dice": 0.5} and manifest.preprocess_config.input_size == 64


def test_round_trip_gives_identical_outputs(saved) -> None:
    directory, network = saved
    state, manifest = load_checkpoint(directory)
    for key, value in network.state_dict().items():
        assert torch.equal(state[key], value), key
    reference = Segmenter(network, manifest, tta=True)
    loaded = Segmenter.from_checkpoint(directory, device="cpu", tta=True)
    assert loaded.checkpoint_sha256 == manifest.weights_sha256 and not loaded.untrained
    assert (loaded.name, loaded.version) == ("ptx-test", "1.2.0")
    rng = np.random.default_rng(0)
    image = SourceImage(pixels=rng.random((90, 70), dtype=np.float32))
    a = reference.predict(image)
    b = loaded.predict(image)
    np.testing.assert_array_equal(a.probability, b.probability)
    np.testing.assert_array_equal(a.mask, b.mask)


def test_flipped_byte_is_refused(saved, tmp_path: Path) -> None:
    directory, _ = saved
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    weights = bytearray((directory / WEIGHTS_FILENAME).read_bytes())
    weights[len(weights) // 2] ^= 0x01
    (copy_dir / WEIGHTS_FILENAME).write_bytes(bytes(weights))
    (copy_dir / MANIFEST_FILENAME).write_bytes((directory / MANIFEST_FILENAME).read_bytes())
    with pytest.raises(CheckpointError, match="corrupted or does not belong to this manifest"):
        load_checkpoint(copy_dir)
    with pytest.raises(CheckpointError, match="sha256"):
        Segmenter.from_checkpoint(copy_dir)


def _write_manifest(saved, tmp_path: Path, **changes) -> Path:
    directory, _ = saved
    data = json.loads((directory / MANIFEST_FILENAME).read_text())
    data.update(changes)
    (tmp_path / WEIGHTS_FILENAME).write_bytes((directory / WEIGHTS_FILENAME).read_bytes())
    (tmp_path / MANIFEST_FILENAME).write_text(json.dumps(data))
    return tmp_path


def test_unknown_format_version_is_refused(saved, tmp_path: Path) -> None:
    path = _write_manifest(saved, tmp_path, format_version=3)
    with pytest.raises(
        CheckpointError,
        match=r"format_version 3 is not supported by this ptx-node \(it reads format_version 1, 2\); "
        "upgrade ptx-node or re-export the checkpoint",
    ):
        load_checkpoint(path)


def test_unknown_fields_and_bad_values_are_refused(saved, tmp_path: Path) -> None:
    path = _write_manifest(saved, tmp_path, calibration={"a": 1})
    with pytest.raises(CheckpointError, match="fields this ptx-node does not understand: calibration"):
        load_checkpoint(path)
    path = _write_manifest(saved, tmp_path, calibration=None)
    data = json.loads((path / MANIFEST_FILENAME).read_text())
    del data["calibration"]
    data["tta"] = ["rot90"]
    (path / MANIFEST_FILENAME).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"unknown transforms \['rot90'\]"):
        load_checkpoint(path)
    data["tta"] = ["hflip"]
    data["input_size"] = 128
    (path / MANIFEST_FILENAME).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="input_size 128 differs from preprocess input_size 64"):
        load_checkpoint(path)
    (path / MANIFEST_FILENAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="No manifest.json"):
        load_checkpoint(tmp_path / "nowhere")

"""Manifest settings the node must honour: TTA list, input scaling, decoder widths, caveat."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import CheckpointError, Manifest, read_manifest, save_checkpoint
from model.infer import Segmenter
from model.network import build_network
from model.preprocess import PreprocessConfig, preprocess


def _checkpoint(tmp_path: Path, **manifest_fields) -> Path:
    torch.manual_seed(0)
    network = build_network("unet", "resnet18", decoder_channels=(32, 16, 16, 8, 8))
    manifest = Manifest(name="t", version="1", architecture="unet", encoder="resnet18", input_size=64,
                        preprocess=PreprocessConfig(input_size=64).to_dict(), decoder_channels=[32, 16, 16, 8, 8],
                        **manifest_fields)
    return save_checkpoint(tmp_path / "ckpt", network, manifest)


def test_manifest_without_tta_is_served_without_tta(tmp_path: Path) -> None:
    segmenter = Segmenter.from_checkpoint(_checkpoint(tmp_path, tta=[]), runtime="torch")
    assert segmenter.tta_transforms == ()
    batch = np.random.default_rng(0).standard_normal((1, 64, 64)).astype(np.float32)
    plain = segmenter.predict_probability_net(batch, tta=False)
    asked = segmenter.predict_probability_net(batch, tta=True)
    np.testing.assert_array_equal(asked, plain)
    hflip = Segmenter.from_checkpoint(_checkpoint(tmp_path, tta=["hflip"]), runtime="torch")
    assert hflip.tta_transforms == ("hflip",)
    assert not np.allclose(hflip.predict_probability_net(batch, tta=True), plain)


def test_minmax_scaling_after_clahe_and_the_default_for_old_manifests(tmp_path: Path) -> None:
    image = np.random.default_rng(1).uniform(0.2, 0.6, (100, 120)).astype(np.float32)
    net, _ = preprocess(image, PreprocessConfig(input_size=64, clahe=True, scaling="minmax"))
    assert net.min() == 0.0 and net.max() == pytest.approx(1.0)
    unit, _ = preprocess(image, PreprocessConfig(input_size=64, clahe=False, scaling="unit"))
    assert 0.2 <= unit.min() and unit.max() <= 0.6
    flat, _ = preprocess(np.full((64, 64), 0.5, np.float32), PreprocessConfig(input_size=64, scaling="minmax"))
    assert not flat.any()
    with pytest.raises(ValueError, match="scaling must be one of"):
        PreprocessConfig(scaling="zscore")
    # a manifest written before the field existed keeps what it was trained with
    path = _checkpoint(tmp_path)
    data = json.loads((path / "manifest.json").read_text())
    del data["preprocess"]["scaling"]
    (path / "manifest.json").write_text(json.dumps(data))
    assert read_manifest(path).preprocess_config.scaling == "standardize"


def test_decoder_widths_and_caveat_round_trip(tmp_path: Path) -> None:
    caveat = "Demo model trained on synthetic phantoms, not for diagnostic use"
    segmenter = Segmenter.from_checkpoint(_checkpoint(tmp_path, caveat=caveat), runtime="torch")
    assert segmenter.caveat == caveat and segmenter.manifest.decoder_channels == [32, 16, 16, 8, 8]
    assert Segmenter.from_checkpoint(_checkpoint(tmp_path)).caveat is None
    with pytest.raises(CheckpointError, match="caveat"):
        Manifest(name="t", version="1", caveat="x" * 65)
    with pytest.raises(ValueError, match="decoder_channels"):
        build_network("unet", "resnet18", decoder_channels=(8, 8))

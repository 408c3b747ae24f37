"""Fold ensembles: format, sha256 pinning of every member, mean of the members' probabilities."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import (
    ENSEMBLE_FORMAT_VERSION,
    MANIFEST_FILENAME,
    WEIGHTS_FILENAME,
    CheckpointError,
    Manifest,
    ensemble_sha256,
    load_checkpoint,
    load_ensemble,
    load_weights,
    read_manifest,
    save_checkpoint,
    save_ensemble,
)
from model.infer import Segmenter
from model.network import build_network
from model.postprocess import PostprocessConfig, postprocess
from model.preprocess import PreprocessConfig, SourceImage
from tests.model.test_checkpoint import _manifest as checkpoint_manifest

FOLDS = (0, 1, 2)
TUNED_ON = "a test's own words: no images"


def _manifest(**overrides) -> Manifest:
    """test_checkpoint's small manifest, with a plain threshold and no lung crop."""
    values = dict(preprocess=PreprocessConfig(input_size=64).to_dict(),
                  postprocess=PostprocessConfig(threshold=0.5, min_area_px=0).to_dict(), training_data={}, metrics={})
    values.update(overrides)
    return checkpoint_manifest(**values)


def _random_network(seed: int, encoder: str = "efficientnet-b0") -> torch.nn.Module:
    torch.manual_seed(seed)
    network = build_network("unet", encoder)
    with torch.no_grad():  # distinct batch-norm statistics: members must differ in their outputs
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return network.eval()


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("members")
    return {fold: save_checkpoint(root / f"fold_{fold}", _random_network(100 + fold), _manifest()) for fold in FOLDS}


@pytest.fixture(scope="module")
def ensemble_dir(members, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ensemble") / "ensemble"
    return save_ensemble(directory, members, _manifest(), postprocess_tuned_on=TUNED_ON)


def _copy(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return target


def _independent_probability(member_dir: Path, net_input: np.ndarray) -> np.ndarray:
    """One member's hflip-TTA probability straight from its weights file, without Segmenter."""
    network = build_network("unet", "efficientnet-b0")
    network.load_state_dict(load_file(str(member_dir / WEIGHTS_FILENAME)))
    network.eval()
    x = torch.from_numpy(net_input)[:, None]
    with torch.no_grad():
        plain = torch.sigmoid(network(x))
        flipped = torch.sigmoid(network(torch.flip(x, dims=(-1,)))).flip(-1)
    return ((plain + flipped) / 2)[:, 0].numpy()


def test_files_and_manifest(ensemble_dir: Path) -> None:
    files = sorted(p.name for p in ensemble_dir.iterdir())
    assert files == ["fold_0.safetensors", "fold_1.safetensors", "fold_2.safetensors", MANIFEST_FILENAME]
    data = json.loads((ensemble_dir / MANIFEST_FILENAME).read_text())
    assert data["format_version"] == ENSEMBLE_FORMAT_VERSION == 2
    ensemble = data["ensemble"]
    assert ensemble["combine"] == "mean_probability"
    assert ensemble["postprocess_tuned_on"] == TUNED_ON
    assert [m["fold"] for m in ensemble["members"]] == list(FOLDS)
    assert data["weights_sha256"] == ensemble_sha256(ensemble["members"])
    manifest = read_manifest(ensemble_dir)
    assert manifest.member_folds == list(FOLDS)


def test_probability_is_the_mean_of_the_members(members, ensemble_dir: Path) -> None:
    segmenter = Segmenter.from_checkpoint(ensemble_dir, runtime="torch", max_batch_size=2)
    rng = np.random.default_rng(3)
    net_input = rng.standard_normal((3, 64, 64)).astype(np.float32)
    each = [_independent_probability(members[fold], net_input) for fold in FOLDS]
    expected = np.mean(each, axis=0)
    got = segmenter.predict_probability_net(net_input, tta=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    for single in each:  # the members differ, so serving one of them would fail the check above
        assert np.abs(single - expected).max() > 1e-3


def test_predict_postprocesses_the_mean_once(members, ensemble_dir: Path) -> None:
    segmenter = Segmenter.from_checkpoint(ensemble_dir, runtime="torch")
    singles = [Segmenter.from_checkpoint(members[fold], runtime="torch") for fold in FOLDS]
    image = SourceImage(pixels=np.random.default_rng(5).random((90, 70), dtype=np.float32))
    prediction = segmenter.predict(image)
    mean = np.mean([s.predict(image).probability for s in singles], axis=0)
    np.testing.assert_allclose(prediction.probability, mean, atol=1e-5)
    again = postprocess(prediction.probability, segmenter.postprocess_config, None)
    np.testing.assert_array_equal(prediction.mask, again.mask)


def test_names_say_it_is_an_ensemble(ensemble_dir: Path) -> None:
    segmenter = Segmenter.from_checkpoint(ensemble_dir, runtime="torch")
    manifest = read_manifest(ensemble_dir)
    assert segmenter.is_ensemble and len(segmenter.networks) == 3
    assert (segmenter.name, segmenter.version) == ("ptx-test", "1.2.0 3-fold ensemble")
    assert segmenter.runtime_name == "torch x3 folds"
    assert segmenter.checkpoint_sha256 == manifest.weights_sha256 and not segmenter.untrained
    # the node writes "<version> sha256:<12 hex>" into 64-character DICOM LO values
    assert len(f"{segmenter.version} sha256:{segmenter.checkpoint_sha256[:12]}") <= 64
    with pytest.raises(CheckpointError, match="too long for an ensemble"):
        dataclasses.replace(manifest, version="v" * 40)


def test_tampered_member_is_refused(ensemble_dir: Path, tmp_path: Path) -> None:
    copy_dir = _copy(ensemble_dir, tmp_path)
    weights = bytearray((copy_dir / "fold_1.safetensors").read_bytes())
    weights[len(weights) // 2] ^= 0x01
    (copy_dir / "fold_1.safetensors").write_bytes(bytes(weights))
    with pytest.raises(CheckpointError, match=r"Ensemble member fold 1 .* corrupted or belongs to another ensemble"):
        Segmenter.from_checkpoint(copy_dir)


def test_missing_member_is_refused(ensemble_dir: Path, tmp_path: Path) -> None:
    copy_dir = _copy(ensemble_dir, tmp_path)
    (copy_dir / "fold_2.safetensors").unlink()
    with pytest.raises(CheckpointError, match="Ensemble member fold 2 is missing: no fold_2.safetensors"):
        load_ensemble(copy_dir)


def test_edited_member_list_is_refused(ensemble_dir: Path, tmp_path: Path) -> None:
    copy_dir = _copy(ensemble_dir, tmp_path)
    data = json.loads((copy_dir / MANIFEST_FILENAME).read_text())
    data["ensemble"]["members"] = data["ensemble"]["members"][:2]  # quietly drop a fold
    (copy_dir / MANIFEST_FILENAME).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="does not match its list of members"):
        Segmenter.from_checkpoint(copy_dir)


def test_member_of_another_architecture_is_refused(members, ensemble_dir: Path, tmp_path: Path) -> None:
    other = save_checkpoint(tmp_path / "other", _random_network(7, "resnet18"), _manifest(encoder="resnet18"))
    with pytest.raises(CheckpointError, match=r"Ensemble member fold 1 .* has encoder 'resnet18'"):
        save_ensemble(tmp_path / "mixed", {0: members[0], 1: other}, _manifest(), postprocess_tuned_on=TUNED_ON)
    # the same mix forged by hand, hashes made consistent: refused when the weights do not fit
    copy_dir = _copy(ensemble_dir, tmp_path)
    shutil.copyfile(other / WEIGHTS_FILENAME, copy_dir / "fold_1.safetensors")
    data = json.loads((copy_dir / MANIFEST_FILENAME).read_text())
    data["ensemble"]["members"][1]["weights_sha256"] = read_manifest(other).weights_sha256
    data["weights_sha256"] = ensemble_sha256(data["ensemble"]["members"])
    (copy_dir / MANIFEST_FILENAME).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"Ensemble member fold 1 does not fit the manifest's network"):
        Segmenter.from_checkpoint(copy_dir)


def test_single_network_checkpoints_are_unchanged(members, ensemble_dir: Path, tmp_path: Path) -> None:
    data = json.loads((members[0] / MANIFEST_FILENAME).read_text())
    assert data["format_version"] == 1 and "ensemble" not in data  # older ptx-node versions read it
    segmenter = Segmenter.from_checkpoint(members[0], runtime="torch")
    assert not segmenter.is_ensemble and segmenter.version == "1.2.0" and segmenter.runtime_name == "torch"
    with pytest.raises(CheckpointError, match="is an ensemble of 3 folds; load it with load_ensemble"):
        load_checkpoint(ensemble_dir)
    with pytest.raises(CheckpointError, match="is a single network, not an ensemble"):
        load_ensemble(members[0])


def test_ensemble_section_needs_its_format_version(ensemble_dir: Path) -> None:
    data = json.loads((ensemble_dir / MANIFEST_FILENAME).read_text())
    with pytest.raises(CheckpointError, match="needs format_version 2, not 1"):
        Manifest.from_dict({**data, "format_version": 1})
    no_section = {k: v for k, v in data.items() if k != "ensemble"}
    with pytest.raises(CheckpointError, match="describes an ensemble but has no ensemble section"):
        Manifest.from_dict(no_section)
    bad = json.loads(json.dumps(data))
    bad["ensemble"]["members"][0]["weights_file"] = "../weights.safetensors"
    with pytest.raises(CheckpointError, match="must be stored as 'fold_0.safetensors'"):
        Manifest.from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["ensemble"]["combine"] = "max_probability"
    with pytest.raises(CheckpointError, match="combine 'max_probability' is unknown"):
        Manifest.from_dict(bad)


def test_segmenter_needs_one_network_per_member(ensemble_dir: Path) -> None:
    manifest = read_manifest(ensemble_dir)
    with pytest.raises(ValueError, match="describes 3 network"):
        Segmenter([_random_network(1), _random_network(2)], manifest)
    with pytest.raises(CheckpointError, match="needs at least 2 member checkpoints, got 1"):
        save_ensemble(ensemble_dir.parent / "one", {1: ensemble_dir}, _manifest(), postprocess_tuned_on=TUNED_ON)


def test_load_weights_reads_and_verifies_either_kind(members, ensemble_dir: Path, tmp_path: Path) -> None:
    single, _ = load_weights(members[0])
    assert list(single) == [None]
    states, manifest = load_weights(ensemble_dir)
    assert list(states) == list(FOLDS) and manifest.member_folds == list(FOLDS)
    copy_dir = _copy(ensemble_dir, tmp_path)
    (copy_dir / "fold_0.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="Ensemble member fold 0 .* has sha256"):
        load_weights(copy_dir)  # what the node's worker preflight runs

"""The three data layouts, the cache, and reproducible stratified splits."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from model.preprocess import PreprocessConfig, preprocess, source_image_from_png
from trainer import data, synth


def _write_png_pair(image_path: Path, mask_path: Path, rng: np.random.Generator, positive: bool) -> np.ndarray:
    image, mask = synth.make_phantom(rng, 64, positive=positive)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(image_path), (image >> 4).astype(np.uint8))
    cv2.imwrite(str(mask_path), mask.astype(np.uint8) * 255)
    return mask


def test_siim_dicom_layout_and_cache(tmp_path: Path) -> None:
    synth.write_synthetic_dataset(tmp_path / "siim", 6, size=64, seed=1)
    (tmp_path / "siim" / "dicom-images-train" / "stray.dcm").write_bytes(b"")  # unlabelled file
    source = data.discover(tmp_path / "siim")
    assert source.layout is data.Layout.SIIM_DICOM and len(source.samples) == 6
    assert source.skipped == {"DICOM file without labels": 1}
    cfg = PreprocessConfig(input_size=32, clahe=False)
    cache = data.build_cache(source, cfg, tmp_path / "cache")
    assert cache.images.shape == (6, 32, 32) and cache.images.dtype == np.float16
    assert int(cache.positive.sum()) == 2 == sum(bool(s.positive_from_labels) for s in source.samples)
    # Cached rows equal model.preprocess on the decoded sample (training == serving).
    image, mask = data.load_sample(source.samples[0])
    expected, transform = preprocess(image, cfg)
    np.testing.assert_allclose(cache.images[0].astype(np.float32), expected, atol=2e-3)
    np.testing.assert_array_equal(cache.masks[0].astype(bool), transform.forward_mask(mask))
    np.testing.assert_allclose(cache.ref_px_per_net_px, (1024 / 32) ** 2)
    again = data.build_cache(source, cfg, tmp_path / "cache")
    assert again.directory == cache.directory  # reused, not rebuilt


def test_png_copy_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    root = tmp_path / "png"
    masks = {}
    for index in range(3):
        masks[f"img{index}"] = _write_png_pair(
            root / "png_images" / f"img{index}.png", root / "png_masks" / f"img{index}.png", rng, index == 0
        )
    (root / "png_images" / "orphan.png").write_bytes(b"")
    source = data.discover(root)
    assert source.layout is data.Layout.SIIM_PNG and [s.image_id for s in source.samples] == ["img0", "img1", "img2"]
    assert source.skipped == {"image without mask": 1}
    image, mask = data.load_sample(source.samples[0])
    assert image.shape == (64, 64) and image.photometric == "PNG"
    np.testing.assert_array_equal(mask, masks["img0"])


def test_ptx498_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    root = tmp_path / "ptx498"
    for site in ("SiteA", "SiteB", "SiteC"):
        for number in (1, 2):
            _write_png_pair(root / site / f"{number}.1.img.png", root / site / f"{number}.2.mask.png", rng, number == 1)
    source = data.discover(root)
    assert source.layout is data.Layout.PTX498 and len(source.samples) == 6
    assert {s.group for s in source.samples} == {"SiteA", "SiteB", "SiteC"}
    assert "SiteB/1" in {s.image_id for s in source.samples}
    image, mask = data.load_sample(next(s for s in source.samples if s.image_id == "SiteB/1"))
    np.testing.assert_allclose(image.pixels, source_image_from_png(root / "SiteB" / "1.1.img.png").pixels)
    assert mask.any()


def test_unknown_layout_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="matches no known layout"):
        data.discover(tmp_path)


def test_holdout_split_is_stratified_and_reproducible(tmp_path: Path) -> None:
    ids = [f"id{i:03d}" for i in range(200)]
    positive = [i % 4 == 0 for i in range(200)]  # 50 positives
    split = data.holdout_split(ids, positive, val_fraction=0.15, seed=7)
    train, val = split.train_val(0)
    assert len(val) == round(50 * 0.15) + round(150 * 0.15) and len(train) + len(val) == 200
    assert sum(split.positive[i] for i in val) == round(50 * 0.15)
    shuffled = data.holdout_split(list(reversed(ids)), list(reversed(positive)), val_fraction=0.15, seed=7)
    assert shuffled.train_val(0)[1] == val  # order of the input does not matter
    path = data.write_split(tmp_path / "split.json", split)
    assert data.read_split(path) == split


def test_kfold_split_covers_every_image_once() -> None:
    ids = [f"id{i:03d}" for i in range(53)]
    positive = [i % 5 == 0 for i in range(53)]
    split = data.kfold_split(ids, positive, n_folds=5, seed=1)
    seen = []
    for fold in range(5):
        _, val = split.train_val(fold)
        seen += val
        assert sum(split.positive[i] for i in val) in (2, 3)  # 11 positives over 5 folds
    assert sorted(seen) == sorted(ids)
    with pytest.raises(ValueError, match="Fold 5 does not exist"):
        split.train_val(5)


def test_kfold_tune_split_is_stratified_apart_and_keeps_old_hashes(tmp_path: Path) -> None:
    ids = [f"id{i:03d}" for i in range(60)]
    positive = [i % 3 == 0 for i in range(60)]
    plain = data.kfold_split(ids, positive, n_folds=3, seed=1, test_fraction=0.1)
    assert "tune_fraction" not in plain.to_dict()  # splits written before tune_fraction keep their sha256
    split = data.kfold_split(ids, positive, n_folds=3, seed=1, test_fraction=0.1, tune_fraction=0.1)
    tune, test = set(split.tune_ids()), set(split.test_ids())
    assert len(tune) == 6 and sum(split.positive[i] for i in tune) == 2 and not tune & test
    assert test == set(plain.test_ids())  # the test split does not move when a tune split is added
    for fold in range(3):
        train, val = split.train_val(fold)
        assert not tune & (set(train) | set(val))
    assert data.read_split(data.write_split(tmp_path / "split.json", split)) == split
    with pytest.raises(ValueError, match="test_fraction \\+ tune_fraction must be in"):
        data.kfold_split(ids, positive, n_folds=3, test_fraction=0.5, tune_fraction=0.5)

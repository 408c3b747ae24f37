"""Split discipline, checked on what the loader actually served.

The images the trainer's own split puts in the test set are marked (their pixels made
flat) before training; every batch the loader serves for training, early stopping and
threshold search (all folds, so fold choice too) is then inspected by index and by pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import torch

from trainer.config import load_config
from trainer.data import build_cache, discover, kfold_split, read_split
from trainer.synth import write_synthetic_dataset
from trainer.training import train


def test_marked_test_images_reach_nothing_but_the_test_evaluation(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    data = tmp_path / "data"
    write_synthetic_dataset(data, 16, size=64, seed=3, positive_fraction=0.5)
    # a small network: what is checked is which images reach the loop, not what it learns
    config = load_config("tiny_test", {"split.kind": "kfold", "split.folds": 2, "split.test_fraction": 0.25,
                                       "optim.batch_size": 2, "runtime.eval_batch_size": 4,
                                       "network.architecture": "unet", "network.encoder": "resnet18",
                                       "network.decoder_channels": [32, 16, 16, 8, 8]})
    source = discover(data)
    ids = [s.image_id for s in source.samples]
    split = kfold_split(ids, [bool(s.positive_from_labels) for s in source.samples], n_folds=2,
                        seed=config.split.seed, test_fraction=0.25)
    test_ids = set(split.test_ids())
    assert len(test_ids) == 4
    for sample in source.samples:  # the mark: a flat image, which no phantom is
        if sample.image_id in test_ids:
            ds = pydicom.dcmread(sample.image_path)
            ds.PixelData = np.full((ds.Rows, ds.Columns), 2048, np.uint16).tobytes()
            ds.save_as(sample.image_path)

    served: list[tuple[str, np.ndarray, torch.Tensor]] = []

    def observer(purpose: str, indices: np.ndarray, images: torch.Tensor, masks: torch.Tensor) -> None:
        served.append((purpose, indices.copy(), images.detach().clone()))

    result = train(config, data, tmp_path / "run", device="cpu", max_steps=2, cache_dir=tmp_path / "cache",
                   progress=False, resume=False, observer=observer)
    assert set(read_split(tmp_path / "run" / "split.json").test_ids()) == test_ids
    cache = build_cache(discover(data), config.preprocess_config, tmp_path / "cache")  # the one trained on
    marked = set(cache.indices(sorted(test_ids)).tolist())
    assert all(float(np.std(cache.images[i].astype(np.float32))) < 1e-4 for i in marked)  # the mark survives

    assert {purpose for purpose, _, _ in served} == {"train", "validation", "threshold_search"}
    assert len(result.folds) == 2  # fold choice ran on both folds' validation searches
    for purpose, indices, images in served:
        assert not marked & set(indices.tolist()), f"a test image was served for {purpose}"
        flat = images.flatten(1).std(dim=1) < 1e-4
        assert not flat.any(), f"a marked image's pixels were served for {purpose}"

    per_image = json.loads((tmp_path / "run" / "test-evaluation" / "per_image.json").read_text())
    assert {row["image_id"] for row in per_image} == test_ids  # the test evaluation, and only it, saw them
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test"]["split"] == "test" and summary["test"]["tta"]["n_images"] == 4

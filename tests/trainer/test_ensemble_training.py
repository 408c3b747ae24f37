"""A k-fold run with ``serve.ensemble``: the fold ensemble it writes, where its postprocess
was searched, and that the node's Segmenter serves it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import read_manifest
from model.infer import Segmenter
from model.preprocess import SourceImage
from trainer.config import ConfigError, load_config
from trainer.data import build_cache, discover, read_split
from trainer.synth import write_synthetic_dataset
from trainer.thresholds import search_postprocess
from trainer.training import _write_ensemble, train

# a small network: what is checked is what the ensemble is made of, not what it learns
SMALL = {"split.kind": "kfold", "split.folds": 3, "split.test_fraction": 0.2, "split.tune_fraction": 0.2,
         "serve.ensemble": True, "optim.batch_size": 2, "runtime.eval_batch_size": 4,
         "network.architecture": "unet", "network.encoder": "resnet18",
         "network.decoder_channels": [32, 16, 16, 8, 8]}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("ensemble-run")
    write_synthetic_dataset(root / "data", 20, size=64, seed=4, positive_fraction=0.5)
    config = load_config("tiny_test", SMALL)
    served: list[tuple[str, np.ndarray]] = []

    def observer(purpose: str, indices: np.ndarray, images: torch.Tensor, masks: torch.Tensor) -> None:
        served.append((purpose, indices.copy()))

    result = train(config, root / "data", root / "run", device="cpu", max_steps=1, cache_dir=root / "cache",
                   progress=False, resume=False, observer=observer)
    cache = build_cache(discover(root / "data"), config.preprocess_config, root / "cache")
    return {"root": root, "config": config, "result": result, "served": served, "cache": cache,
            "split": read_split(root / "run" / "split.json")}


def test_tune_split_is_apart_from_folds_and_test(run: dict) -> None:
    split = run["split"]
    tune, test = set(split.tune_ids()), set(split.test_ids())
    assert len(tune) == 4 and len(test) == 4 and not tune & test
    for fold in range(3):
        train_ids, val_ids = split.train_val(fold)
        assert not tune & (set(train_ids) | set(val_ids))
    tune_idx = set(run["cache"].indices(sorted(tune)).tolist())
    assert {purpose for purpose, _ in run["served"]} == {"train", "validation", "threshold_search"}
    for purpose, indices in run["served"]:
        assert not tune_idx & set(indices.tolist()), f"a tune image was served for {purpose}"


def test_ensemble_manifest_records_members_combination_and_tuning(run: dict) -> None:
    result = run["result"]
    assert result.ensemble == run["root"] / "run" / "ensemble"
    manifest = read_manifest(result.ensemble)
    assert manifest.member_folds == [0, 1, 2]
    assert manifest.ensemble["combine"] == "mean_probability"
    assert manifest.ensemble["postprocess_tuned_on"].startswith("tune split: 4 images that no member trained")
    info = manifest.metrics["ensemble"]
    assert info["postprocess_tuned_on"] == {"split": "tune", "n_images": 4}
    assert "each member first averaging its own TTA views (hflip)" in info["combine"]
    assert manifest.training_data["split"]["member_folds"] == [0, 1, 2]
    # the search ran on the tune images, with the ensemble's own probabilities
    cache, split = run["cache"], run["split"]
    index = cache.indices(split.tune_ids())
    segmenter = Segmenter.from_checkpoint(result.ensemble, runtime="torch")
    probability = segmenter.predict_probability_net(cache.images[index].astype(np.float32), tta=True)
    search = search_postprocess(probability, cache.masks[index] > 0, cache.ref_px_per_net_px[index],
                                run["config"].threshold_search)
    assert manifest.metrics["threshold_search"] == json.loads(json.dumps(search.to_dict()))
    assert manifest.postprocess == search.config.to_dict()


def test_segmenter_serves_the_trained_folds_mean(run: dict) -> None:
    result = run["result"]
    ensemble = Segmenter.from_checkpoint(result.ensemble)  # the node's call, default runtime
    assert ensemble.version == "0.1.0 3-fold ensemble" and ensemble.is_ensemble
    members = [Segmenter.from_checkpoint(fold.checkpoint, runtime="torch") for fold in result.folds]
    image = SourceImage(pixels=np.random.default_rng(2).random((80, 72), dtype=np.float32))
    expected = np.mean([m.predict(image).probability for m in members], axis=0)
    np.testing.assert_allclose(ensemble.predict(image).probability, expected, atol=1e-4)


def test_summary_and_report_show_the_ensemble_on_test(run: dict) -> None:
    out = run["root"] / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ensemble"]["member_folds"] == [0, 1, 2]
    assert summary["ensemble_test"]["split"] == "test" and summary["ensemble_test"]["tta"]["n_images"] == 4
    metrics = json.loads((out / "test-evaluation-ensemble" / "metrics.json").read_text())
    assert metrics["model"]["version"] == "0.1.0 3-fold ensemble" and metrics["model"]["ensemble_folds"] == [0, 1, 2]
    per_image = json.loads((out / "test-evaluation-ensemble" / "per_image.json").read_text())
    assert {row["image_id"] for row in per_image} == set(run["split"].test_ids())
    report = (out / "report.md").read_text()
    assert "## Fold ensemble" in report and "searched on the tune split (4 images" in report
    assert "## Test split (fold ensemble, 4 images" in report


def test_without_tune_split_the_manifest_says_it_was_not_tuned(run: dict, tmp_path: Path) -> None:
    from dataclasses import replace

    split = run["split"]
    no_tune = replace(split, fold_of={i: (0 if f == -3 else f) for i, f in split.fold_of.items()}, tune_fraction=0.0)
    results = run["result"].folds
    best = results[1]
    info = _write_ensemble(run["config"], run["cache"], no_tune, results, best, tmp_path / "ens", torch.device("cpu"))
    manifest = read_manifest(tmp_path / "ens")
    assert info["postprocess_tuned_on"] == {"split": None, "reused_from_fold": 1}
    assert manifest.ensemble["postprocess_tuned_on"].startswith("not tuned for the ensemble: fold 1's own validation")
    assert manifest.postprocess == read_manifest(best.checkpoint).postprocess
    assert "threshold_search" not in manifest.metrics


def test_recipe_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="serve.ensemble needs split.kind = 'kfold'"):
        load_config("tiny_test", {"serve.ensemble": True})
    with pytest.raises(ConfigError, match="tune_fraction is for k-fold runs"):
        load_config("tiny_test", {"split.tune_fraction": 0.2})
    with pytest.raises(ValueError, match="at least 2 trained folds"):
        _write_ensemble(load_config("tiny_test", SMALL), None, None, [], None, Path("/nonexistent"), torch.device("cpu"))

"""Each published recipe end to end on CPU at tiny sizes, as `ptx-train` runs it.

Only sizes and step counts are overridden (and `encoder_weights`, since tests download
nothing); everything else is the recipe as shipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.checkpoint import read_manifest
from model.infer import Segmenter
from trainer.cli import main
from trainer.synth import write_png_dataset, write_synthetic_dataset

TINY = ["--device", "cpu", "--quiet", "--max-steps", "1", "--set", "network.encoder_weights=\"none\"",
        "--set", "preprocess.input_size=64", "--set", "optim.batch_size=2", "--set", "runtime.eval_batch_size=4",
        "--set", "runtime.num_workers=0"]


@pytest.fixture(scope="module")
def siim_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("siim")
    write_synthetic_dataset(root, 12, size=64, seed=5, positive_fraction=0.5)
    return root


def test_unetpp_recipe_folds_minmax_and_tta_validation(siim_dicom: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "unetpp_b4_256_clahe_crop", "--data", str(siim_dicom), "--out", str(out),
                 "--cache", str(tmp_path / "cache"), "--set", "split.folds=2", *TINY]) == 0
    manifest = read_manifest(out / "checkpoint")
    assert manifest.preprocess["scaling"] == "minmax" and manifest.preprocess["lung_crop"] is True
    assert manifest.tta == ["hflip"]
    assert set(manifest.metrics["postprocess_by_mode"]) == {"plain", "tta"}
    summary = json.loads((out / "summary.json").read_text())
    assert [fold["fold"] for fold in summary["folds"]] == [0, 1]
    assert manifest.metrics["cross_validation"]["selected_fold"] in (0, 1)
    segmenter = Segmenter.from_checkpoint(out / "checkpoint")
    assert segmenter.tta_transforms == ("hflip",)


def test_unet_recipe_on_png_copy_then_ptx498_pixel_table(tmp_path: Path, capsys) -> None:
    torch.set_num_threads(2)
    png = tmp_path / "png"
    write_png_dataset(png, 8, layout="siim-png", size=64, seed=6, positive_fraction=0.5)
    ptx498 = tmp_path / "ptx498"
    write_png_dataset(ptx498, 3, layout="ptx498", size=64, seed=7)
    out = tmp_path / "run"
    assert main(["train", "unet_b4_512", "--data", str(png), "--out", str(out), "--cache", str(tmp_path / "cache"),
                 "--set", "evaluation.score_size=64", *TINY]) == 0
    manifest = read_manifest(out / "checkpoint")
    assert manifest.tta == [] and manifest.architecture == "unet"
    assert manifest.metrics["threshold_search"]["objective"] == "pixel_iou"
    assert Segmenter.from_checkpoint(out / "checkpoint").tta_transforms == ()
    capsys.readouterr()
    assert main(["evaluate", str(out / "checkpoint"), str(ptx498), "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "pixel level, pooled over 3 images" in printed and "Dice (F1)" in printed and "accuracy" in printed
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["resolution"] == "64x64" and metrics["served_mode"] == "plain"
    assert (tmp_path / "eval" / "pixel_confusion_matrix.png").is_file()
    assert sum(sum(row) for row in metrics["plain"]["pixel_confusion_matrix"]) == 3 * 64 * 64


def test_compare_backbones_writes_one_table_from_the_test_split(siim_dicom: Path, tmp_path: Path, capsys) -> None:
    recipes = ["backbones_resnet50", "backbones_efficientnet_b4", "backbones_xception"]
    assert main(["compare", *recipes, "--data", str(siim_dicom), "--out", str(tmp_path / "cmp"),
                 "--cache", str(tmp_path / "cache"), "--set", "split.test_fraction=0.25", *TINY]) == 0
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [row["recipe"] for row in rows] == recipes
    split = json.loads((tmp_path / "cmp" / "split.json").read_text())
    test_ids = {row["image_id"] for row in split["images"] if row["fold"] == -2}
    assert len(test_ids) == 4  # a quarter of the 6 positives and of the 6 negatives, rounded
    for row in rows:
        assert row["split"] == "test" and row["n_test_images"] == len(test_ids)
        assert 0.0 <= row["challenge_dice"] <= 1.0 and 0.0 <= row["pixel_accuracy"] <= 1.0
        assert row["parameters"] > 1e6 and row["seconds_per_image"] > 0 and row["peak_memory_bytes"] > 0
        # every recipe trained on the one split
        assert json.loads((tmp_path / "cmp" / row["recipe"] / "split.json").read_text()) == split
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert all(recipe in table for recipe in recipes) and "test" in table and "ms / image" in table

"""A two-step training run at 64 px on a synthetic set, its checkpoint, resume and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from model.checkpoint import load_checkpoint
from model.infer import Segmenter
from trainer.cli import main
from trainer.config import load_config
from trainer.evaluate import evaluate
from trainer.testing import train_tiny_checkpoint
from trainer.training import train


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("tiny")
    first = train_tiny_checkpoint(root, n_images=8, steps=1)
    history_after_first = json.loads((root / "run" / "fold_0" / "history.json").read_text())
    # Same run directory, a larger step budget: resumes from last.pt instead of starting over.
    resumed = train(load_config("tiny_test"), root / "data", root / "run", device="cpu", max_steps=2,
                    cache_dir=root / "cache", progress=False)
    return {"root": root, "first": first, "history_after_first": history_after_first, "result": resumed}


def test_checkpoint_loads_and_serves(run: dict) -> None:
    checkpoint = run["result"].checkpoint
    assert checkpoint == run["first"] and (checkpoint / "weights.safetensors").is_file()
    segmenter = Segmenter.from_checkpoint(checkpoint, tta=True)
    assert not segmenter.untrained and segmenter.name == "tiny_test" and segmenter.input_size == 64
    dicom_path = next((run["root"] / "data" / "dicom-images-train").rglob("*.dcm"))
    dataset = pydicom.dcmread(dicom_path)
    prediction = segmenter.predict(dataset)
    assert prediction.mask.shape == (dataset.Rows, dataset.Columns) == prediction.probability.shape
    assert 0.0 <= prediction.score <= 1.0 and prediction.area_mm2 is not None


def test_manifest_records_search_metrics_and_data(run: dict) -> None:
    _, manifest = load_checkpoint(run["result"].checkpoint)
    summary = run["result"].summary
    assert manifest.postprocess == summary["folds"][0]["postprocess"]
    assert manifest.postprocess["threshold"] in (0.3, 0.5) and manifest.postprocess["min_area_px"] in (0, 500)
    search = manifest.metrics["threshold_search"]
    assert search["mode"] == "threshold" and 0.0 <= search["score"] <= 1.0 and search["n_images"] == 2
    assert set(manifest.metrics["validation"]) >= {"plain", "tta_hflip", "searched_dice"}
    assert manifest.metrics["cross_validation"]["selected_fold"] == 0
    data = manifest.training_data
    assert data["layout"] == "siim-dicom" and data["n_images"] == 8 and data["n_positive"] == 3
    assert (data["n_train"], data["n_val"]) == (6, 2)
    split = json.loads((run["root"] / "run" / "split.json").read_text())
    assert data["split"]["kind"] == split["kind"] == "holdout"
    assert manifest.preprocess["input_size"] == 64 and manifest.tta == ["hflip"]


def test_run_resumed_from_last_state(run: dict) -> None:
    assert [row["step"] for row in run["history_after_first"]] == [1]
    history = json.loads((run["root"] / "run" / "fold_0" / "history.json").read_text())
    assert [row["step"] for row in history] == [1, 2]
    assert history[0] == run["history_after_first"][0]  # the first epoch was not redone
    for row in history:
        assert np.isfinite(row["train_loss"]) and 0.0 <= row["val_dice"] <= 1.0
    out = run["root"] / "run"
    for name in ("report.md", "curves.png", "summary.json", "config.json", "fold_0/last.pt"):
        assert (out / name).stat().st_size > 0
    assert "curves.png" in (out / "report.md").read_text()


def test_resume_refuses_a_different_recipe(run: dict) -> None:
    other = load_config("tiny_test", {"optim.lr": 0.5})
    with pytest.raises(ValueError, match="different recipe"):
        train(other, run["root"] / "data", run["root"] / "run", device="cpu", max_steps=2,
              cache_dir=run["root"] / "cache", progress=False)


def test_evaluate_writes_metrics_plots_and_report(run: dict, tmp_path: Path) -> None:
    result = evaluate(run["result"].checkpoint, run["root"] / "data", tmp_path, progress=False, batch_size=4)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for mode in ("plain", "tta"):
        assert metrics[mode]["n_images"] == 8 and metrics[mode]["n_positive"] == 3
        assert 0.0 <= metrics[mode]["challenge_dice"] <= 1.0
        assert sum(map(sum, metrics[mode]["confusion_matrix"])) == 8
    assert metrics["resolution"] == "source"
    for name in ("confusion_matrix.png", "tta_vs_plain.png", "montage.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert name in result.report_path.read_text()
    per_image = json.loads((tmp_path / "per_image.json").read_text())
    assert np.mean([r["dice_tta"] for r in per_image]) == pytest.approx(metrics["tta"]["challenge_dice"])


def test_cli_evaluate_on_split_validation_images(run: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["evaluate", str(run["result"].checkpoint), str(run["root"] / "data"), "--out", str(tmp_path),
                 "--split", str(run["root"] / "run" / "split.json"), "--quiet"])
    assert code == 0
    assert "challenge Dice" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["tta"]["n_images"] == 2


def test_cli_synth_configs_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["synth", str(tmp_path / "s"), "--n", "3", "--size", "64", "--seed", "4"]) == 0
    assert (tmp_path / "s" / "train-rle.csv").is_file()
    assert len(list((tmp_path / "s").rglob("*.dcm"))) == 3
    assert main(["configs"]) == 0
    assert "unet_b4_512" in capsys.readouterr().out
    assert main(["train", "no_such_recipe", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "No recipe 'no_such_recipe'" in capsys.readouterr().err

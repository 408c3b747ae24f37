"""bench/train.py --smoke: both benchmark modes run end to end on CPU at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train.py"


def test_training_bench_smoke(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "smoke.json").read_text())
    throughput = results["throughput"]
    assert throughput["plain"]["images_per_s"] > 0 and throughput["ours_compiled"]["images_per_s"] > 0
    assert throughput["ratio"] == throughput["ours_compiled"]["ratio_vs_plain"] > 0
    learning = results["learning"]
    assert 0.0 <= learning["val_challenge_dice_tta"] <= 1.0 and learning["val_images"] >= 1
    assert Path(learning["report"]).is_file()

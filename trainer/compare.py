"""``ptx-train compare``: several recipes on one split, one table of test-split results.

The first recipe's split (which must hold a test set) is written once and every recipe
trains on it; each served checkpoint is then scored on the test images (trainer.evaluate),
and its parameters, inference time per image and peak memory are measured in a fresh
process on the device used, so one model's allocations do not count against the next.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import load_config
from trainer.report import format_value

__all__ = ["CompareResult", "compare", "measure_inference"]


@dataclass
class CompareResult:
    out_dir: Path
    table_path: Path
    rows: list[dict[str, Any]]


def measure_inference(checkpoint: str | Path, device: str = "cpu", repeats: int = 5) -> dict[str, Any]:
    """Parameters, median seconds per image (batch 1, plain PyTorch, served TTA) and peak memory.

    Peak memory: CUDA's peak allocated bytes, or on the CPU the growth of this process's
    peak resident set while the model is loaded and run (so run it in a fresh process).
    """
    import statistics
    import time

    import numpy as np
    import torch

    from model.infer import Segmenter

    baseline_kib = _reset_peak_rss_kib()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    segmenter = Segmenter.from_checkpoint(checkpoint, device=device, runtime="torch")
    size = segmenter.input_size
    batch = np.zeros((1, size, size), np.float32)
    segmenter.predict_probability_net(batch)  # warm-up: allocator, kernels
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        segmenter.predict_probability_net(batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    if device.startswith("cuda"):
        peak_bytes = int(torch.cuda.max_memory_allocated())
        memory_kind = "cuda peak allocated"
    else:
        peak_bytes = 1024 * max(0, _peak_rss_kib() - baseline_kib)
        memory_kind = "cpu peak RSS growth"
    return {
        "parameters": sum(p.numel() for p in segmenter.network.parameters()),
        "seconds_per_image": statistics.median(seconds),
        "peak_memory_bytes": peak_bytes,
        "memory_kind": memory_kind,
        "device": device,
        "threads": torch.get_num_threads(),
        "tta": list(segmenter.tta_transforms),
        "input_size": size,
    }


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss_kib() -> int:
    """Current resident set (KiB); on Linux also resets the peak, so imports before do not count."""
    import resource

    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_kib() -> int:
    import resource

    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _measure_in_fresh_process(checkpoint: Path, device: str) -> dict[str, Any]:
    code = ("import json, sys; from trainer.compare import measure_inference; "
            "print(json.dumps(measure_inference(sys.argv[1], sys.argv[2])))")
    done = subprocess.run([sys.executable, "-c", code, str(checkpoint), device],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"Measuring {checkpoint} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(
    recipes: Sequence[str],
    data_root: str | Path,
    out_dir: str | Path,
    *,
    device: str | None = None,
    max_steps: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    split_file: str | Path | None = None,
    cache_dir: str | Path | None = None,
    labels_file: str | Path | None = None,
    progress: bool = True,
) -> CompareResult:
    """Train each recipe on one split and write ``compare.md`` / ``compare.json``."""
    import torch

    from trainer.data import read_split
    from trainer.training import train

    if len(recipes) < 1:
        raise ValueError("compare needs at least one recipe.")
    configs = [load_config(recipe, overrides) for recipe in recipes]
    names = [config.name for config in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"Recipes must differ; got {', '.join(names)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shared_split = Path(split_file) if split_file else None
    rows = []
    for config in configs:
        run_dir = out_dir / config.name
        result = train(config, data_root, run_dir, device=device, max_steps=max_steps, cache_dir=cache_dir,
                       labels_file=labels_file, split_file=shared_split, resume=False, progress=progress)
        if shared_split is None:
            shared_split = out_dir / "split.json"
            shared_split.write_text((run_dir / "split.json").read_text())
            if not read_split(shared_split).test_ids():
                raise ValueError(
                    f"compare scores on a test split, and recipe {config.name!r} makes none: "
                    "set split.test_fraction (--set split.test_fraction=0.15) or pass --split."
                )
        test = result.summary["test"]
        served = test[test["served_mode"]]
        measured = _measure_in_fresh_process(result.checkpoint, device)
        rows.append({
            "recipe": config.name,
            "network": f"{config.network.architecture} / {config.network.encoder}",
            "input_size": config.input_size,
            "split": "test",
            "n_test_images": served["n_images"],
            "served_mode": test["served_mode"],
            "challenge_dice": served["challenge_dice"],
            "pixel_dice": served["pixel_dice"],
            "mean_iou": served["mean_iou"],
            "pixel_iou": served["pixel_iou"],
            "pixel_accuracy": served["pixel_accuracy"],
            **measured,
            "checkpoint": str(result.checkpoint),
        })
    (out_dir / "compare.json").write_text(json.dumps(rows, indent=1))
    table_path = out_dir / "compare.md"
    table_path.write_text(_table(rows, shared_split))
    return CompareResult(out_dir, table_path, rows)


def _table(rows: list[dict[str, Any]], split_file: Path | None) -> str:
    lines = [
        "# Recipe comparison",
        "",
        f"Same split for every recipe (`{split_file}`); every metric from its **test** split, "
        "at source resolution, with the inference mode each recipe serves; inference time per image "
        "(batch 1, median of 5) and peak memory measured in a fresh process on the device named.",
        "",
        "| recipe | network | input | test images | TTA | challenge Dice | pixel Dice | mean IoU | pixel IoU "
        "| pixel accuracy | parameters | ms / image | peak memory | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['recipe']} | {row['network']} | {row['input_size']} | {row['n_test_images']} | "
            f"{'hflip' if row['served_mode'] == 'tta' else 'none'} | {format_value(row['challenge_dice'])} | "
            f"{format_value(row['pixel_dice'])} | {format_value(row['mean_iou'])} | {format_value(row['pixel_iou'])} | "
            f"{format_value(row['pixel_accuracy'])} | {row['parameters'] / 1e6:.1f} M | "
            f"{1000 * row['seconds_per_image']:.0f} | {row['peak_memory_bytes'] / 2**20:.0f} MiB ({row['memory_kind']}) | "
            f"{row['device']} |"
        )
    return "\n".join(lines) + "\n"

"""Augmentation cost per batch on the CPU, per recipe, next to a plain hflip baseline.

For each recipe: the batch size and input size it trains at, random network-ready images
and masks, and per batch (median of ``--repeats`` after one warm-up):
- ``baseline``: the hand-written hflip + brightness/contrast on the batch (what the trainer
  did before kornia/albumentations);
- ``device``: the recipe's kornia pipeline + brightness/contrast (trainer.augment.DeviceAugment);
- ``host``: its albumentations part per sample (trainer.augment.HostAugment), where it has one.
Wall and CPU seconds are both reported; the ratio is to the baseline of the same run.

    python bench/augment.py                       # the published recipes
    python bench/augment.py --recipes unet_b4_512 --batch 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer.augment import build_augmentations  # noqa: E402
from trainer.config import load_config  # noqa: E402

RECIPES = ("unetpp_b4_256_clahe_crop", "unet_b4_512", "backbones_resnet50", "demo_phantom")


def _timed(function: Callable[[], Any], repeats: int) -> dict[str, float]:
    function()  # warm-up: kernels, allocator, albumentations' first call
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_ms": 1000 * statistics.median(walls), "cpu_ms": 1000 * statistics.median(cpus)}


def _baseline(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = images.shape[0]
    flip = (torch.rand(n) < 0.5).view(n, 1, 1, 1)
    images = torch.where(flip, images.flip(-1), images)
    masks = torch.where(flip, masks.flip(-1), masks)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    std = images.std(dim=(1, 2, 3), keepdim=True)
    alpha = 1.0 + (torch.rand(n, 1, 1, 1) * 2 - 1) * 0.2
    return (images - mean) * alpha + mean + 0.1 * std, masks


def measure(recipe: str, *, batch: int | None, repeats: int) -> dict[str, Any]:
    config = load_config(recipe)
    size, n = config.input_size, batch or config.optim.batch_size
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.standard_normal((n, 1, size, size)).astype(np.float32))
    masks = torch.from_numpy((rng.random((n, 1, size, size)) > 0.9).astype(np.float32))
    host, device = build_augmentations(config.augment, size, seed=0)
    row: dict[str, Any] = {"recipe": recipe, "input_size": size, "batch": n,
                           "baseline": _timed(lambda: _baseline(images, masks), repeats),
                           "device": _timed(lambda: device(images, masks), repeats)}
    if host is not None:
        images_np, masks_np = images[:, 0].numpy(), masks[:, 0].numpy().astype(np.uint8)
        row["host"] = _timed(lambda: [host(i, m) for i, m in zip(images_np, masks_np, strict=True)], repeats)
    total = row["device"]["wall_ms"] + row.get("host", {}).get("wall_ms", 0.0)
    row["total_wall_ms"] = total
    row["ratio_vs_baseline"] = total / row["baseline"]["wall_ms"]
    return row


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--batch", type=int, default=None, help="default: each recipe's batch size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "augment.json")
    options = parser.parse_args(args)
    torch.set_num_threads(options.threads)
    rows = [measure(recipe, batch=options.batch, repeats=options.repeats) for recipe in options.recipes]
    result = {"environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
              "rows": rows}
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=1))
    for row in rows:
        host = row.get("host")
        print(f"{row['recipe']}: batch {row['batch']} x {row['input_size']} px: kornia {row['device']['wall_ms']:.0f} ms "
              f"(cpu {row['device']['cpu_ms']:.0f})"
              + (f", albumentations {host['wall_ms']:.0f} ms (cpu {host['cpu_ms']:.0f})" if host else "")
              + f"; baseline hflip+b/c {row['baseline']['wall_ms']:.1f} ms; ratio {row['ratio_vs_baseline']:.1f}x",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The demo's model: the ``demo_phantom`` recipe trained by ``ptx-train`` on synthetic phantoms.

Trained once into ``OUT/run`` (minutes on two CPU cores), then reused: the node's demo
serves ``OUT/run/checkpoint`` through the same checkpoint path as any trained model. Every
output it makes carries the recipe's caveat (a demo model, not for diagnostic use).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

__all__ = ["DEMO_RECIPE", "demo_checkpoint"]

DEMO_RECIPE = "demo_phantom"
DEMO_IMAGES = 240
DEMO_SOURCE_SIZE = 256  # phantoms are drawn at 256 px; the recipe trains at 160
DEMO_DATA_SEED = 1
DEMO_POSITIVE_FRACTION = 0.6


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # cache-building workers
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def demo_checkpoint(out_dir: str | Path, *, progress: bool = False) -> Path:
    """The demo checkpoint under ``out_dir``, trained first if it is not there yet."""
    import torch

    from model.checkpoint import read_manifest
    from trainer.config import load_config
    from trainer.synth import write_synthetic_dataset
    from trainer.training import train

    out_dir = Path(out_dir)
    checkpoint = out_dir / "run" / "checkpoint"
    config = load_config(DEMO_RECIPE)
    timing_path = out_dir / "timing.json"
    if (checkpoint / "manifest.json").is_file() and timing_path.is_file():
        timing = json.loads(timing_path.read_text())
        if timing.get("config") == config.model_dump(mode="json"):
            read_manifest(checkpoint)  # still a valid checkpoint
            print(f"demo model: cached at {checkpoint} (trained in {timing['wall_seconds']:.0f} s wall, "
                  f"{timing['cpu_seconds']:.0f} s CPU)")
            return checkpoint
    wall_start, cpu_start = time.perf_counter(), _cpu_seconds()
    data_dir = out_dir / "data"
    if not (data_dir / "train-rle.csv").is_file():
        write_synthetic_dataset(data_dir, DEMO_IMAGES, size=DEMO_SOURCE_SIZE, seed=DEMO_DATA_SEED,
                                positive_fraction=DEMO_POSITIVE_FRACTION)
    synth_seconds = time.perf_counter() - wall_start
    torch.set_num_threads(min(2, torch.get_num_threads()))  # what the budget is stated for
    result = train(config, data_dir, out_dir / "run", device="cpu", cache_dir=out_dir / "cache",
                   resume=False, progress=progress)
    timing = {
        "wall_seconds": time.perf_counter() - wall_start,
        "cpu_seconds": _cpu_seconds() - cpu_start,
        "synth_seconds": synth_seconds,
        "threads": torch.get_num_threads(),
        "validation": result.summary["folds"][0]["validation"],
        "config": config.model_dump(mode="json"),
    }
    timing_path.write_text(json.dumps(timing, indent=1))
    searched = timing["validation"]["searched_score"]
    print(f"demo model: trained in {timing['wall_seconds']:.0f} s wall, {timing['cpu_seconds']:.0f} s CPU "
          f"({timing['threads']} threads); validation Dice after threshold search {searched:.3f}; {result.checkpoint}")
    return result.checkpoint

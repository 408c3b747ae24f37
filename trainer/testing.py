"""Helpers for tests elsewhere (node tests load a real trained checkpoint)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["train_tiny_checkpoint"]


def train_tiny_checkpoint(
    out_dir: str | Path,
    *,
    n_images: int = 8,
    steps: int = 2,
    image_size: int = 96,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Synthesize a small SIIM-layout set and train the ``tiny_test`` recipe on CPU.

    Returns the checkpoint directory (``model.Segmenter.from_checkpoint`` loads it).
    Everything lives under ``out_dir``: ``data/``, ``cache/``, ``run/``.
    """
    import torch

    from trainer.config import load_config
    from trainer.synth import write_synthetic_dataset
    from trainer.training import train

    if n_images < 4:
        raise ValueError(f"n_images must be at least 4 (train and validation both need images), got {n_images}.")
    out_dir = Path(out_dir)
    data_dir = out_dir / "data"
    if not (data_dir / "train-rle.csv").is_file():
        write_synthetic_dataset(data_dir, n_images, size=image_size, seed=seed)
    config = load_config("tiny_test", {"seed": seed})
    with torch.random.fork_rng(devices=[]):
        result = train(
            config, data_dir, out_dir / "run", device="cpu", max_steps=steps,
            cache_dir=out_dir / "cache", progress=progress, resume=False,
        )
    return result.checkpoint

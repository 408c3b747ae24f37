"""``ptx-train``: synthetic data, training, evaluation."""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set needs KEY=VALUE, got {text!r}.")
    key, raw = text.split("=", 1)
    try:  # TOML literal: numbers, booleans, arrays, quoted strings
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _setup_argparser(args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ptx-train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write a synthetic SIIM-layout dataset (DICOM + train-rle.csv)")
    synth.add_argument("out", type=Path)
    synth.add_argument("--n", type=int, required=True, help="number of images")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--positive-fraction", type=float, default=0.4)

    train = commands.add_parser("train", help="train a recipe (trainer/configs/NAME.toml or a path)")
    train.add_argument("config", help="recipe name or TOML path")
    train.add_argument("--data", type=Path, required=True, help="dataset root (any supported layout)")
    train.add_argument("--out", type=Path, required=True, help="run directory (resumed when it exists)")
    train.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    train.add_argument("--max-steps", type=int, default=None, help="stop each fold after this many steps")
    train.add_argument("--fold", type=int, action="append", dest="folds", help="train only this fold (repeatable)")
    train.add_argument("--cache", type=Path, default=None, help="cache directory (default ~/.cache/ptx-train)")
    train.add_argument("--labels", type=Path, default=None, help="RLE CSV to use instead of the one found")
    train.add_argument("--split", type=Path, default=None, help="split.json to reuse")
    train.add_argument("--no-resume", action="store_true", help="start over even if --out holds a run")
    train.add_argument("--set", type=_parse_override, action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value, e.g. --set optim.batch_size=8")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    evaluate = commands.add_parser("evaluate", help="score a checkpoint on a labelled dataset")
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("data", type=Path)
    evaluate.add_argument("--out", type=Path, default=None, help="default: CHECKPOINT/../evaluation")
    evaluate.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    evaluate.add_argument("--split", type=Path, default=None, help="evaluate only this split's validation images")
    evaluate.add_argument("--fold", type=int, default=0)
    evaluate.add_argument("--labels", type=Path, default=None)
    evaluate.add_argument("--max-images", type=int, default=None)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--quiet", action="store_true")

    commands.add_parser("configs", help="list the shipped recipes")
    return parser.parse_args(args)


def main(args: Sequence[str] | None = None) -> int:
    options = _setup_argparser(args)
    try:
        return _run(options)
    except (ValueError, FileNotFoundError) as error:
        print(f"ptx-train: error: {error}", file=sys.stderr)
        return 2


def _run(options: argparse.Namespace) -> int:
    if options.command == "synth":
        from trainer.synth import write_synthetic_dataset

        summary = write_synthetic_dataset(
            options.out, options.n, size=options.size, seed=options.seed, positive_fraction=options.positive_fraction
        )
        print(f"wrote {summary.n_images} images ({summary.n_positive} positive) and {summary.rle_csv}")
        return 0
    if options.command == "configs":
        from trainer.config import available_configs, load_config

        for name in available_configs():
            print(f"{name}: {load_config(name).description}")
        return 0
    if options.command == "train":
        from trainer.config import load_config
        from trainer.training import train

        config = load_config(options.config, dict(options.set))
        result = train(
            config, options.data, options.out, device=options.device, max_steps=options.max_steps,
            folds=options.folds, cache_dir=options.cache, labels_file=options.labels, split_file=options.split,
            resume=not options.no_resume, progress=not options.quiet,
        )
        if result.summary:
            print(f"checkpoint: {result.checkpoint}")
            print(f"report: {result.out_dir / 'report.md'}")
        return 0
    if options.command == "evaluate":
        from trainer.evaluate import evaluate

        out = options.out or options.checkpoint.resolve().parent / "evaluation"
        result = evaluate(
            options.checkpoint, options.data, out, device=options.device, split_file=options.split,
            fold=options.fold, labels_file=options.labels, max_images=options.max_images,
            batch_size=options.batch_size, progress=not options.quiet,
        )
        tta, plain = result.metrics["tta"], result.metrics["plain"]
        print(f"challenge Dice: plain {plain['challenge_dice']:.4f}, TTA {tta['challenge_dice']:.4f} "
              f"on {tta['n_images']} images")
        print(f"metrics: {result.metrics_path}")
        print(f"report: {result.report_path}")
        return 0
    raise AssertionError(options.command)


if __name__ == "__main__":
    sys.exit(main())

"""``ptx-train``: synthetic data, training, evaluation."""

from __future__ import annotations

import argparse
import json
import os
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


def _rle_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rle-absolute-start", type=int, choices=(0, 1), default=None,
                        help="first pixel index of an absolute RLE file such as stage_2_train.csv (default 0; "
                             "it cannot be checked offline); relative files (train-rle.csv) ignore it")


def _setup_argparser(args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ptx-train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write a synthetic SIIM-layout dataset (DICOM + train-rle.csv)")
    synth.add_argument("out", type=Path)
    synth.add_argument("--n", type=int, required=True, help="number of images")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--positive-fraction", type=float, default=0.4)
    synth.add_argument("--mask-png", action="store_true",
                       help="also write each known mask as masks/<SOPInstanceUID>.png (0/255)")

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
    _rle_option(train)

    evaluate = commands.add_parser("evaluate", help="score a checkpoint on a labelled dataset")
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("data", type=Path)
    evaluate.add_argument("--out", type=Path, default=None, help="default: CHECKPOINT/../evaluation")
    evaluate.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    evaluate.add_argument("--split", type=Path, default=None,
                          help="evaluate only this split's test images (or --subset validation)")
    evaluate.add_argument("--subset", choices=("test", "validation"), default=None,
                          help="with --split: default test when the split has one, else validation")
    evaluate.add_argument("--fold", type=int, default=0, help="the fold whose validation images --subset validation means")
    evaluate.add_argument("--score-size", type=int, default=None,
                          help="count pixels on an N x N grid (default: the recipe's, else source resolution)")
    evaluate.add_argument("--labels", type=Path, default=None)
    evaluate.add_argument("--max-images", type=int, default=None)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--quiet", action="store_true")
    _rle_option(evaluate)

    compare = commands.add_parser("compare", help="train recipes on one split and tabulate their test results")
    compare.add_argument("recipes", nargs="+", help="recipe names or TOML paths")
    compare.add_argument("--data", type=Path, required=True)
    compare.add_argument("--out", type=Path, required=True)
    compare.add_argument("--device", choices=("cpu", "cuda"), default=None)
    compare.add_argument("--max-steps", type=int, default=None)
    compare.add_argument("--split", type=Path, default=None, help="split.json (with a test set) to use for all")
    compare.add_argument("--cache", type=Path, default=None)
    compare.add_argument("--labels", type=Path, default=None)
    compare.add_argument("--set", type=_parse_override, action="append", default=[], metavar="KEY=VALUE",
                         help="override a value in every recipe")
    compare.add_argument("--quiet", action="store_true")
    _rle_option(compare)

    demo = commands.add_parser("demo-model", help="train (once, then cached) the demo model on synthetic phantoms")
    demo.add_argument("out", type=Path, help="directory holding data/, run/ and the checkpoint")
    demo.add_argument("--quiet", action="store_true")

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
    if getattr(options, "rle_absolute_start", None) is not None:
        from trainer.data import RLE_ABSOLUTE_START_ENV

        os.environ[RLE_ABSOLUTE_START_ENV] = str(options.rle_absolute_start)
    if options.command == "synth":
        from trainer.synth import write_synthetic_dataset

        summary = write_synthetic_dataset(
            options.out, options.n, size=options.size, seed=options.seed, positive_fraction=options.positive_fraction,
            mask_png=options.mask_png,
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
            test = result.summary.get("test")
            if test:
                from trainer.evaluate import headline

                for line in headline(json.loads((Path(test["report"]).parent / "metrics.json").read_text())):
                    print(line)
            print(f"checkpoint: {result.checkpoint}")
            if result.ensemble is not None:
                print(f"ensemble: {result.ensemble}")
            print(f"report: {result.out_dir / 'report.md'}")
        return 0
    if options.command == "compare":
        from trainer.compare import compare

        outcome = compare(
            options.recipes, options.data, options.out, device=options.device, max_steps=options.max_steps,
            overrides=dict(options.set), split_file=options.split, cache_dir=options.cache,
            labels_file=options.labels, progress=not options.quiet,
        )
        print(outcome.table_path.read_text())
        print(f"table: {outcome.table_path}")
        return 0
    if options.command == "demo-model":
        from trainer.demo_model import demo_checkpoint

        demo_checkpoint(options.out, progress=not options.quiet)
        return 0
    if options.command == "evaluate":
        from trainer.evaluate import evaluate, headline

        out = options.out or options.checkpoint.resolve().parent / "evaluation"
        result = evaluate(
            options.checkpoint, options.data, out, device=options.device, split_file=options.split,
            fold=options.fold, subset=options.subset, labels_file=options.labels, max_images=options.max_images,
            batch_size=options.batch_size, score_size=options.score_size, progress=not options.quiet,
        )
        for line in headline(result.metrics):
            print(line)
        print(f"metrics: {result.metrics_path}")
        print(f"report: {result.report_path}")
        return 0
    raise AssertionError(options.command)


if __name__ == "__main__":
    sys.exit(main())

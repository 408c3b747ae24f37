"""Training benchmark: our loop next to a plain segmentation-models-pytorch AMP loop.

Throughput (default): UNet++/EfficientNet-B4 at 512 px, bf16, global batch 32, end-to-end
images/s (batch gather + augmentation + step) of ``trainer.training`` (cache on the GPU,
device augmentation, channels-last, fused Adam, torch.compile) and of a plain loop
(NCHW, autocast bf16, Adam, BCE + Dice, DataLoader from numpy with pinned memory and
workers), in the same process on the same data; reports the ratio (goal >= 3x).

Learning (``--learning``): ``ptx-train``'s path end to end on a synthetic set (DICOM +
RLE), then ``evaluate`` on the held-out 15%: validation challenge Dice (goal >= 0.9).

``--smoke``: tiny sizes on CPU, to check that both modes run.

    python bench/train.py                 # throughput on CUDA
    python bench/train.py --learning      # learning run on CUDA
    python bench/train.py --smoke         # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from model.network import build_network  # noqa: E402
from model.preprocess import PreprocessConfig, preprocess  # noqa: E402
from trainer.config import TrainConfig, load_config  # noqa: E402
from trainer.data import cache_from_arrays  # noqa: E402
from trainer.synth import make_phantom  # noqa: E402
from trainer.training import measure_throughput  # noqa: E402

DEFAULT_RECIPE = "default_unetpp_b4_512"


def _setup_argparser(args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=DEFAULT_RECIPE,
                        help=f"any ptx-train recipe (name or TOML path; default {DEFAULT_RECIPE}): its network, "
                             "augmentations, loss and precision; the plain loop trains the same network")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of both modes")
    parser.add_argument("--learning", action="store_true", help="learning run instead of throughput")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--size", type=int, default=512, help="network input size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=512, help="distinct images in the throughput set")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps (compilation, autotuning)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the plain loop")
    parser.add_argument("--compile-mode", default="default",
                        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    parser.add_argument("--no-eager-variant", action="store_true", help="skip our loop without torch.compile")
    parser.add_argument("--learning-images", type=int, default=1000)
    parser.add_argument("--learning-source-size", type=int, default=256, help="synthetic DICOM size")
    parser.add_argument("--learning-size", type=int, default=256, help="network input size of the learning run")
    parser.add_argument("--learning-epochs", type=int, default=40)
    parser.add_argument("--learning-lr", type=float, default=3e-4)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "train")
    return parser.parse_args(args)


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _environment(device: str) -> dict[str, Any]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


# --------------------------------------------------------------------------- data


def _phantom_arrays(n: int, size: int, cfg: PreprocessConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Network-ready phantoms through model.preprocess (drawn at <= 256 px, then resized)."""
    import cv2

    rng = np.random.default_rng(seed)
    draw = min(size, 256)
    images = np.empty((n, size, size), np.float32)
    masks = np.empty((n, size, size), np.uint8)
    for i in range(n):
        raw, mask = make_phantom(rng, draw)
        raw = cv2.resize(raw.astype(np.float32) / 4095.0, (size, size), interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
        net, transform = preprocess(np.clip(raw, 0, 1), cfg)
        images[i] = net
        masks[i] = transform.forward_mask(mask.astype(bool))
    return images, masks


# --------------------------------------------------------------------------- plain loop


class _NumpySegmentationSet(torch.utils.data.Dataset):
    """What a plain pipeline does: numpy arrays, random hflip on the CPU, tensors out."""

    def __init__(self, images: np.ndarray, masks: np.ndarray) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.images[index], self.masks[index]
        if np.random.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return (torch.from_numpy(np.ascontiguousarray(image))[None],
                torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None])


def plain_smp_loop(
    images: np.ndarray, masks: np.ndarray, *, device: str, batch: int, warmup: int, steps: int, workers: int,
    config: TrainConfig,
) -> dict[str, Any]:
    """The published baseline: NCHW, autocast bf16, Adam, BCE + Dice, DataLoader from numpy,
    on the recipe's network (UNet++ / EfficientNet-B4 by default)."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    dev = torch.device(device)
    n = config.network
    # smp model, encoder_weights=None
    network = build_network(n.architecture, n.encoder, decoder_channels=n.decoder_channels).to(dev)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    bce = torch.nn.BCEWithLogitsLoss()
    dice = smp.losses.DiceLoss(mode="binary", from_logits=True)
    loader = torch.utils.data.DataLoader(
        _NumpySegmentationSet(images, masks), batch_size=batch, shuffle=True, drop_last=True,
        num_workers=workers, pin_memory=dev.type == "cuda", persistent_workers=workers > 0,
    )
    use_autocast = dev.type == "cuda"
    network.train()
    done, started = 0, time.perf_counter()
    loss_sum = torch.zeros((), device=dev)
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
                logits = network(x)
                loss = bce(logits, y) + dice(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            done += 1
            if done >= warmup + steps:
                break
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {"images_per_s": steps * batch / elapsed, "step_ms": 1000 * elapsed / steps, "steps": steps,
            "warmup_steps": warmup, "global_batch": batch, "workers": workers, "mean_loss": loss_sum.item() / done}


# --------------------------------------------------------------------------- modes


def _our_config(recipe: str, size: int, batch: int, *, compile: bool, compile_mode: str,
                extra: dict[str, Any] | None = None) -> TrainConfig:
    overrides = {
        "network.encoder_weights": "none",
        "preprocess.input_size": size,
        "optim.batch_size": batch,
        "runtime.precision": "bf16",
        "runtime.channels_last": True,
        "runtime.compile": compile,
        "runtime.compile_mode": compile_mode,
        "runtime.data_on_device": "auto",
    }
    overrides.update(extra or {})
    return load_config(recipe, overrides)


def run_throughput(options: argparse.Namespace, out: Path) -> dict[str, Any]:
    device = _device(options.device)
    cfg = _our_config(options.recipe, options.size, options.batch, compile=True, compile_mode=options.compile_mode)
    started = time.perf_counter()
    images, masks = _phantom_arrays(options.images, options.size, cfg.preprocess_config)
    data_seconds = time.perf_counter() - started
    cache = cache_from_arrays(out / "cache", images, masks, cfg.preprocess_config)
    results: dict[str, Any] = {"mode": "throughput", "recipe": cfg.name, "environment": _environment(device),
                               "size": options.size, "batch": options.batch, "images": options.images,
                               "data_seconds": data_seconds}
    print(f"[train bench] {options.images} phantoms at {options.size} px ready in {data_seconds:.1f}s", flush=True)
    results["plain"] = plain_smp_loop(images, masks, device=device, batch=options.batch,
                                      warmup=options.warmup, steps=options.steps, workers=options.workers, config=cfg)
    print(f"[train bench] plain smp loop: {results['plain']['images_per_s']:.1f} img/s", flush=True)
    variants = {"ours_compiled": True}
    if not options.no_eager_variant:
        variants = {"ours_eager": False, **variants}
    for name, compiled in variants.items():
        config = _our_config(options.recipe, options.size, options.batch, compile=compiled,
                             compile_mode=options.compile_mode)
        results[name] = measure_throughput(config, cache, device=device, warmup_steps=options.warmup, steps=options.steps)
        results[name]["ratio_vs_plain"] = results[name]["images_per_s"] / results["plain"]["images_per_s"]
        print(f"[train bench] {name}: {results[name]['images_per_s']:.1f} img/s "
              f"({results[name]['ratio_vs_plain']:.2f}x plain)", flush=True)
        torch.cuda.empty_cache() if device.startswith("cuda") else None
    best = max((k for k in results if k.startswith("ours_")), key=lambda k: results[k]["images_per_s"])
    results["best_ours"] = best
    results["ratio"] = results[best]["ratio_vs_plain"]
    results["goal_ratio"] = 3.0
    return results


def run_learning(options: argparse.Namespace, out: Path) -> dict[str, Any]:
    from trainer.evaluate import evaluate
    from trainer.synth import write_synthetic_dataset
    from trainer.training import train

    device = _device(options.device)
    data_dir = out / "learning-data"
    started = time.perf_counter()
    if not (data_dir / "train-rle.csv").is_file():
        write_synthetic_dataset(data_dir, options.learning_images, size=options.learning_source_size, seed=11)
    synth_seconds = time.perf_counter() - started
    config = _our_config(options.recipe, options.learning_size, options.batch, compile=device.startswith("cuda"),
                         compile_mode=options.compile_mode, extra={
                             "optim.epochs": options.learning_epochs, "optim.lr": options.learning_lr,
                             "early_stopping.patience": max(10, options.learning_epochs),
                             "runtime.num_workers": 0 if options.smoke else 4,
                         })
    run_dir = out / "learning-run"
    started = time.perf_counter()
    result = train(config, data_dir, run_dir, device=device, cache_dir=out / "learning-cache", resume=False,
                   progress=True, max_steps=1 if options.smoke else None)
    train_seconds = time.perf_counter() - started
    evaluation = evaluate(result.checkpoint, data_dir, run_dir / "evaluation", device=device,
                          split_file=run_dir / "split.json", batch_size=options.batch, progress=False)
    tta, plain = evaluation.metrics["tta"], evaluation.metrics["plain"]
    return {
        "mode": "learning", "recipe": config.name, "environment": _environment(device),
        "images": options.learning_images, "source_size": options.learning_source_size,
        "input_size": options.learning_size, "epochs": options.learning_epochs,
        "synth_seconds": synth_seconds, "train_seconds": train_seconds,
        "val_images": tta["n_images"], "val_positive": tta["n_positive"],
        "val_challenge_dice_tta": tta["challenge_dice"], "val_challenge_dice_plain": plain["challenge_dice"],
        "val_dice_positive_tta": tta["dice_positive"], "val_image_auc_tta": tta["image_auc"],
        "postprocess": evaluation.metrics["postprocess"], "report": str(evaluation.report_path),
        "goal_dice": 0.9, "reached": tta["challenge_dice"] >= 0.9,
    }


def main(args: Sequence[str] | None = None) -> int:
    options = _setup_argparser(args)
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    if options.smoke:
        options.device = options.device or "cpu"
        options.size, options.batch, options.images = 64, 4, 12
        options.warmup, options.steps, options.workers = 1, 1, 0
        options.learning_images, options.learning_source_size = 12, 64
        options.learning_size, options.learning_epochs = 64, 1
        options.no_eager_variant = True
        results = {"throughput": run_throughput(options, out / "throughput"),
                   "learning": run_learning(options, out / "learning")}
    elif options.learning:
        results = run_learning(options, out)
    else:
        results = run_throughput(options, out)
    text = json.dumps(results, indent=1, default=str)
    (out / ("smoke.json" if options.smoke else "learning.json" if options.learning else "throughput.json")).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

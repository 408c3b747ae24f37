"""Inference benchmark: ``model.Segmenter`` next to plain segmentation-models-pytorch.

CPU (always): model-only time per image with hflip TTA at 512 px, ``--threads`` threads
(default 2). "plain" is smp UNet++/EfficientNet-B4, eager fp32 NCHW, ``model(x)`` and
``model(flip(x))`` under ``torch.no_grad``; "ours" is ``Segmenter.predict_probability_net``
with its default CPU runtime (ONNX Runtime when installed) and, for the breakdown, its
PyTorch runtime (inference mode, channels-last, both TTA views in one batch). Same weights,
same preprocessed radiograph, rounds interleaved so background load hits all variants
alike; reports per-image medians, minima, the median of per-round ratios and the max abs
probability difference vs plain. ``--ensemble N`` (N >= 2) adds a fold ensemble of N members
on the default CPU path, in the same rounds, and its cost relative to one network on that
path (every member holds the same weights: the time does not depend on their values, and
the members share one ONNX export; the ensemble's probability must then equal the single's).

GPU (when CUDA is present): images/s at batch 32 with hflip TTA: plain smp (bf16 autocast,
NCHW, two calls) vs ours (bf16 autocast, channels-last, one batch of 64 views,
``torch.compile``), same process, same data.

    python bench/infer.py                      # CPU (2 threads), and GPU if present
    python bench/infer.py --smoke              # tiny sizes, seconds: checks that it runs
    python bench/infer.py --device cpu --size 256 --ensemble 3   # + a 3-fold ensemble
    python bench/infer.py --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
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

import segmentation_models_pytorch as smp  # noqa: E402

from model.checkpoint import ENSEMBLE_FORMAT_VERSION, Manifest, member_weights_filename  # noqa: E402
from model.infer import TTA_TRANSFORMS, Segmenter  # noqa: E402
from model.network import build_network  # noqa: E402
from model.preprocess import PreprocessConfig, preprocess, source_image_from_dataset  # noqa: E402
from model.runtime import onnxruntime_available  # noqa: E402


def _setup_argparser(args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="network input size")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch and ONNX Runtime)")
    parser.add_argument("--rounds", type=int, default=10, help="timed CPU rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    parser.add_argument("--gpu-batch", type=int, default=32)
    parser.add_argument("--gpu-steps", type=int, default=30)
    parser.add_argument("--gpu-warmup", type=int, default=10, help="untimed GPU steps (compilation)")
    parser.add_argument("--no-compile", action="store_true", help="GPU: ours without torch.compile")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    parser.add_argument("--ensemble", type=int, default=0, metavar="N",
                        help="CPU: also time a fold ensemble of N members (N >= 2) on the default CPU path")
    parser.add_argument("--smoke", action="store_true", help="size 64, 2 rounds: a quick check")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    parsed = parser.parse_args(args)
    if parsed.ensemble == 1 or parsed.ensemble < 0:
        parser.error("--ensemble needs N >= 2 members (0: no ensemble)")
    if parsed.smoke:
        parsed.size, parsed.rounds, parsed.warmup = 64, 2, 1
        parsed.gpu_batch, parsed.gpu_steps, parsed.gpu_warmup = 4, 2, 1
    return parsed


def _cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _input_image(size: int) -> np.ndarray:
    """A real radiograph (pydicom-data RG1_UNCR) preprocessed as served; noise if absent."""
    try:
        import pydicom
        from pydicom.data import get_testdata_file

        path = get_testdata_file("RG1_UNCR.dcm", download=False)
        image = source_image_from_dataset(pydicom.dcmread(path))
        net_input, _ = preprocess(image, PreprocessConfig(input_size=size))
        return net_input
    except Exception:  # noqa: BLE001 - the benchmark runs without test data too
        return np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)


def _plain_smp(ours: torch.nn.Module) -> torch.nn.Module:
    """The baseline: smp's own UNet++/B4, same weights as ours."""
    plain = smp.UnetPlusPlus("efficientnet-b4", encoder_weights=None, in_channels=1, classes=1)
    plain.load_state_dict(ours.state_dict())
    return plain.eval()


def _manifest(size: int, ensemble: int = 0) -> Manifest:
    if not ensemble:
        return Manifest(name="bench", version="0", input_size=size,
                        preprocess=PreprocessConfig(input_size=size).to_dict())
    members = [{"fold": k, "weights_file": member_weights_filename(k), "weights_sha256": "0" * 64}
               for k in range(ensemble)]
    section = {"combine": "mean_probability", "members": members, "postprocess_tuned_on": "benchmark: no tuning"}
    return Manifest(name="bench", version="0", input_size=size, preprocess=PreprocessConfig(input_size=size).to_dict(),
                    ensemble=section, format_version=ENSEMBLE_FORMAT_VERSION)


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def bench_cpu(opts: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    network = build_network()  # UNet++ / EfficientNet-B4, random weights
    plain = _plain_smp(network)
    image = _input_image(opts.size)
    x = torch.from_numpy(image)[None, None]

    def plain_tta() -> np.ndarray:
        with torch.no_grad():
            a = torch.sigmoid(plain(x))
            b = torch.sigmoid(plain(torch.flip(x, dims=(-1,)))).flip(-1)
        return ((a + b) / 2)[0, 0].numpy()

    batch = image[None]
    variants: dict[str, Callable[[], np.ndarray]] = {"plain smp fp32 eager": plain_tta}
    runtimes = ["torch"] + (["auto"] if onnxruntime_available() else [])
    segmenters: dict[str, Segmenter] = {}
    for runtime in runtimes:
        seg = Segmenter(copy.deepcopy(network), _manifest(opts.size), runtime=runtime, num_threads=opts.threads)
        started = time.perf_counter()
        name = f"ours ({seg.runtime_name})"  # builds the runner (ONNX export or cache hit)
        setup_s = time.perf_counter() - started
        segmenters[name] = seg
        variants[name] = lambda seg=seg: seg.predict_probability_net(batch, tta=True)[0]
        print(f"[cpu] {name}: runner ready in {setup_s:.1f} s", flush=True)
    single_name = next(reversed(segmenters))  # the default CPU path: onnxruntime when installed
    ensemble_name = None
    if opts.ensemble:
        members = [copy.deepcopy(network) for _ in range(opts.ensemble)]
        seg = Segmenter(members, _manifest(opts.size, opts.ensemble), runtime=runtimes[-1], num_threads=opts.threads)
        started = time.perf_counter()
        ensemble_name = f"ours ({seg.runtime_name})"
        print(f"[cpu] {ensemble_name}: runners ready in {time.perf_counter() - started:.1f} s", flush=True)
        variants[ensemble_name] = lambda seg=seg: seg.predict_probability_net(batch, tta=True)[0]

    reference = plain_tta()
    if not np.isfinite(reference).all():
        raise RuntimeError("plain smp produced non-finite probabilities")
    for fn in variants.values():
        for _ in range(opts.warmup):
            fn()
    load_before = _load()
    times: dict[str, list[float]] = {name: [] for name in variants}
    max_diff: dict[str, float] = {name: 0.0 for name in variants}
    for round_index in range(opts.rounds):
        for name, fn in variants.items():
            started = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - started)
            if not np.isfinite(out).all():
                raise RuntimeError(f"{name} produced non-finite probabilities")
            max_diff[name] = max(max_diff[name], float(np.abs(out - reference).max()))
        print(f"[cpu] round {round_index + 1}/{opts.rounds}: "
              + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()), flush=True)
    load_after = _load()

    base = times["plain smp fp32 eager"]
    results = {}
    for name, samples in times.items():
        ratios = [b / s for b, s in zip(base, samples, strict=True)]
        results[name] = {
            "median_s_per_image": statistics.median(samples),
            "min_s_per_image": min(samples),
            "speedup_vs_plain_median_of_rounds": statistics.median(ratios),
            "speedup_vs_plain_min": min(base) / min(samples),
            "max_abs_prob_diff_vs_plain": max_diff[name],
        }
    default_name = next(n for n in variants if n.startswith("ours (onnxruntime")) if onnxruntime_available() \
        else "ours (torch)"
    ensemble: dict[str, Any] | None = None
    if ensemble_name is not None:
        ratios = [e / s for e, s in zip(times[ensemble_name], times[single_name], strict=True)]
        ensemble = {
            "members": opts.ensemble,
            "variant": ensemble_name,
            "single_variant": single_name,
            "cost_vs_single_median_of_rounds": statistics.median(ratios),
            "cost_vs_single_median": statistics.median(times[ensemble_name]) / statistics.median(times[single_name]),
        }
    return {
        "cpu_model": _cpu_model_name(),
        "threads": opts.threads,
        "size": opts.size,
        "tta": "hflip",
        "rounds": opts.rounds,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "default_cpu_path": default_name,
        "variants": results,
        "ensemble": ensemble,
    }


def bench_gpu(opts: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    network = build_network()
    plain = _plain_smp(network).to(device)
    image = _input_image(opts.size)
    batch_np = np.repeat(image[None], opts.gpu_batch, axis=0)
    batch_gpu = torch.from_numpy(batch_np)[:, None].to(device)

    def plain_step() -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            a = torch.sigmoid(plain(batch_gpu).float())
            b = torch.sigmoid(plain(torch.flip(batch_gpu, dims=(-1,))).float()).flip(-1)
        return (a + b) / 2

    seg = Segmenter(network, _manifest(opts.size), device="cuda", runtime="torch",
                    compile=not opts.no_compile, max_batch_size=opts.gpu_batch)

    transforms = [TTA_TRANSFORMS["hflip"]]

    def ours_step() -> torch.Tensor:
        # Model-only, like plain: the batch is already on the GPU; TTA views in one batch.
        with torch.inference_mode():
            return seg._probabilities(batch_gpu, transforms)  # noqa: SLF001 - benchmark internals

    def throughput(step: Callable[[], torch.Tensor], warmup: int) -> float:
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(opts.gpu_steps):
            step()
        torch.cuda.synchronize()
        return opts.gpu_batch * opts.gpu_steps / (time.perf_counter() - started)

    compile_started = time.perf_counter()
    ours_step()
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - compile_started
    plain_ips = throughput(plain_step, opts.gpu_warmup)
    ours_ips = throughput(ours_step, opts.gpu_warmup)
    diff = float((plain_step().float().cpu() - ours_step().float().cpu()[:, None]).abs().max())
    return {
        "gpu": torch.cuda.get_device_name(0),
        "batch": opts.gpu_batch,
        "size": opts.size,
        "tta": "hflip",
        "plain_images_per_s": plain_ips,
        "ours_images_per_s": ours_ips,
        "speedup": ours_ips / plain_ips,
        "ours_first_call_s": first_call_s,
        "ours_runtime": seg.runtime_name,
        "max_abs_prob_diff_vs_plain_bf16": diff,
    }


def main(args: Sequence[str] | None = None) -> int:
    opts = _setup_argparser(args)
    report: dict[str, Any] = {
        "command": "python bench/infer.py " + " ".join(sys.argv[1:] if args is None else args),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import onnxruntime

        report["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        report["onnxruntime"] = None
    if opts.device in ("all", "cpu"):
        report["cpu"] = bench_cpu(opts)
    if opts.device in ("all", "cuda"):
        if torch.cuda.is_available():
            report["gpu"] = bench_gpu(opts)
        else:
            report["gpu"] = "not run: CUDA is not available"
    print(json.dumps(report, indent=2))
    if opts.json is not None:
        opts.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``ptx-train evaluate``: a checkpoint on a labelled set, TTA on and off.

Predictions go through the same path the node serves (model.preprocess -> network ->
``GeometricTransform.inverse`` -> model.postprocess), and are scored against the masks with
the challenge metric and the seeds' tables, at source resolution or on the square grid the
paper scored (``score_size``). Plain and hflip-TTA inference each use the post-processing
tuned for them on validation (manifest ``metrics.postprocess_by_mode``). With a split file,
only its test (default, when it has one) or validation images are scored, and every table
says which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from model.infer import Segmenter
from model.postprocess import PostprocessConfig, postprocess
from model.preprocess import preprocess
from trainer import plots
from trainer.data import Layout, Sample, discover, load_sample, read_split
from trainer.metrics import MetricAccumulator
from trainer.report import format_value

__all__ = ["EvaluationResult", "evaluate", "headline", "pixel_table"]

MODES = ("plain", "tta")
_THUMB = 256


@dataclass
class EvaluationResult:
    out_dir: Path
    metrics_path: Path
    report_path: Path
    metrics: dict[str, Any]
    figures: dict[str, Path] = field(default_factory=dict)


def _thumb(array: np.ndarray, nearest: bool) -> np.ndarray:
    scale = _THUMB / max(array.shape)
    size = (max(1, round(array.shape[1] * scale)), max(1, round(array.shape[0] * scale)))
    if nearest:
        return cv2.resize(array.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    return cv2.resize(array.astype(np.float32), size, interpolation=cv2.INTER_AREA)


SUBSETS = ("test", "validation")


def _select_samples(
    samples: tuple[Sample, ...], split_file: Path | None, fold: int, subset: str | None
) -> tuple[list[Sample], str]:
    """The samples to score and the name of the split they are ("all" without a split file)."""
    if split_file is None:
        return list(samples), "all"
    split = read_split(split_file)
    if subset is None:
        subset = "test" if split.test_ids() else "validation"
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {', '.join(SUBSETS)}; got {subset!r}.")
    if subset == "test":
        wanted = set(split.test_ids())
        if not wanted:
            raise ValueError(f"Split file {str(split_file)!r} has no test images (its test_fraction is 0).")
    else:
        wanted = set(split.train_val(fold)[1])
    selected = [s for s in samples if s.image_id in wanted]
    if not selected:
        raise ValueError(f"No image of the split's {subset} set is in this data directory.")
    return selected, subset if subset == "test" else f"validation (fold {fold})"


def _probabilities(segmenter: Segmenter, batch: np.ndarray) -> dict[str, np.ndarray]:
    """Plain and hflip-TTA probabilities; hflip is computed even for a manifest served without it."""
    plain = segmenter.predict_probability_net(batch, tta=False)
    # Same mean as Segmenter's hflip TTA, reusing the plain view: 2 forwards, not 3.
    flipped = segmenter.predict_probability_net(np.ascontiguousarray(batch[:, :, ::-1]), tta=False)
    return {"plain": plain, "tta": (plain + flipped[:, :, ::-1]) / 2}


def _postprocess_by_mode(segmenter: Segmenter) -> dict[str, PostprocessConfig]:
    """Each mode's own tuned thresholds when the trainer searched both, else the served ones."""
    tuned = segmenter.manifest.metrics.get("postprocess_by_mode") or {}
    return {mode: PostprocessConfig.from_dict(tuned[mode]) if mode in tuned else segmenter.postprocess_config
            for mode in MODES}


def _on_score_grid(mask: np.ndarray, score_size: int | None) -> np.ndarray:
    if score_size is None or mask.shape == (score_size, score_size):
        return mask
    return cv2.resize(mask.astype(np.uint8), (score_size, score_size), interpolation=cv2.INTER_NEAREST).astype(bool)


def _training_histories(checkpoint: Path) -> dict[int, list[dict[str, Any]]]:
    """Curves of the run that produced the checkpoint, when it sits in a ptx-train out dir."""
    histories = {}
    for run_dir in (checkpoint.parent, checkpoint.parent.parent):
        for path in sorted(run_dir.glob("fold_*/history.json")):
            try:
                histories[int(path.parent.name.split("_")[1])] = json.loads(path.read_text())
            except (ValueError, IndexError, json.JSONDecodeError):
                continue
        if histories:
            break
    return histories


def evaluate(
    checkpoint: str | Path,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    split_file: str | Path | None = None,
    fold: int = 0,
    subset: str | None = None,
    labels_file: str | Path | None = None,
    max_images: int | None = None,
    batch_size: int = 8,
    montage_count: int = 6,
    score_size: int | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Score ``checkpoint`` on ``data_root``, or on a split's test / validation images.

    ``score_size``: count pixels on that square grid (default: the manifest's
    ``metrics.evaluation_protocol.score_size``, else each image's source grid).
    """
    from tqdm.auto import tqdm

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    segmenter = Segmenter.from_checkpoint(checkpoint, device=device, tta=True, max_batch_size=batch_size)
    source = discover(data_root, labels_file=labels_file)
    samples, subset_name = _select_samples(source.samples, Path(split_file) if split_file else None, fold, subset)
    if score_size is None:
        score_size = (segmenter.manifest.metrics.get("evaluation_protocol") or {}).get("score_size")
    postprocess_configs = _postprocess_by_mode(segmenter)
    if max_images is not None:
        samples = samples[:max_images]
    accumulators = {mode: MetricAccumulator() for mode in MODES}
    per_image: list[dict[str, Any]] = []
    thumbs: list[dict[str, Any]] = []
    n_thumb_pos = n_thumb_neg = 0
    bar = tqdm(total=len(samples), unit="img", desc="evaluate", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        loaded = [load_sample(sample) for sample in chunk]
        prepared = [preprocess(image, segmenter.preprocess_config) for image, _ in loaded]
        batch = np.stack([net for net, _ in prepared])
        probabilities = _probabilities(segmenter, batch)
        for i, (sample, (image, truth), (_, transform)) in enumerate(zip(chunk, loaded, prepared, strict=True)):
            row: dict[str, Any] = {"image_id": sample.image_id, "truth_positive": bool(truth.any())}
            predictions = {}
            for mode in MODES:
                probability_src = np.clip(transform.inverse(probabilities[mode][i], order="linear"), 0.0, 1.0)
                prediction = postprocess(probability_src, postprocess_configs[mode], image.pixel_spacing_mm)
                stats = accumulators[mode].add(_on_score_grid(prediction.mask, score_size),
                                               _on_score_grid(truth, score_size), prediction.score)
                predictions[mode] = prediction
                row[f"dice_{mode}"] = stats.dice
                row[f"score_{mode}"] = prediction.score
            per_image.append(row)
            positive = bool(truth.any())
            if (positive and n_thumb_pos < 2 * montage_count) or (not positive and n_thumb_neg < montage_count):
                n_thumb_pos += positive
                n_thumb_neg += not positive
                thumbs.append({
                    "image": _thumb(image.pixels, False), "truth": _thumb(truth, True),
                    "prediction": _thumb(predictions["tta"].mask, True), "dice": row["dice_tta"],
                    "positive": positive, "image_id": sample.image_id,
                })
        bar.update(len(chunk))
    bar.close()
    if not per_image:
        raise ValueError("No images to evaluate.")

    results = {mode: accumulators[mode].result().to_dict() for mode in MODES}
    manifest = segmenter.manifest
    metrics = {
        "checkpoint": str(checkpoint),
        "model": {"name": manifest.name, "version": segmenter.version, "weights_sha256": manifest.weights_sha256,
                  "architecture": manifest.architecture, "encoder": manifest.encoder, "input_size": manifest.input_size,
                  "ensemble_folds": manifest.member_folds or None},
        "postprocess": segmenter.postprocess_config.to_dict(),
        "postprocess_by_mode": {mode: config.to_dict() for mode, config in postprocess_configs.items()},
        "served_mode": "tta" if segmenter.tta_transforms else "plain",
        "data": source.describe(),
        "subset": {"split_file": str(split_file) if split_file else None, "fold": fold if split_file else None,
                   "split": subset_name, "n_images": len(per_image)},
        "resolution": f"{score_size}x{score_size}" if score_size else "source",
        **results,
    }
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=1))
    (out_dir / "per_image.json").write_text(json.dumps(per_image, indent=0))

    figures = {
        "confusion_matrix": plots.plot_confusion_matrix(results["tta"]["confusion_matrix"], out_dir / "confusion_matrix.png",
                                                        title="Image level (TTA)"),
        "pixel_confusion_matrix": plots.plot_confusion_matrix(
            results[metrics["served_mode"]]["pixel_confusion_matrix"], out_dir / "pixel_confusion_matrix.png",
            title=f"Pixel level ({'TTA' if metrics['served_mode'] == 'tta' else 'no TTA'})", normalize=True),
        "tta_vs_plain": plots.plot_tta_comparison(
            results["plain"], results["tta"],
            np.array([r["dice_plain"] for r in per_image]), np.array([r["dice_tta"] for r in per_image]),
            out_dir / "tta_vs_plain.png",
        ),
    }
    chosen = _choose_montage(thumbs, montage_count)
    if chosen:
        figures["montage"] = plots.plot_montage(
            [plots.MontageExample(t["image"], t["truth"], t["prediction"],
                                  f"{t['image_id'][-24:]}  Dice {t['dice']:.3f}") for t in chosen],
            out_dir / "montage.png",
        )
    histories = _training_histories(checkpoint)
    if histories:
        figures["curves"] = plots.plot_curves(histories, out_dir / "curves.png")
    report_path = _write_report(out_dir, metrics, figures)
    return EvaluationResult(out_dir, metrics_path, report_path, metrics, figures)


def _choose_montage(thumbs: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Best and worst positives and some negatives: the figure should show failures too."""
    positives = sorted((t for t in thumbs if t["positive"]), key=lambda t: -t["dice"])
    negatives = [t for t in thumbs if not t["positive"]]
    n_neg = min(len(negatives), max(1, count // 3)) if negatives else 0
    n_pos = min(len(positives), count - n_neg)
    n_best = (n_pos + 1) // 2
    worst_start = max(n_best, len(positives) - n_pos // 2)
    return (positives[:n_best] + positives[worst_start:] + negatives[:n_neg])[:count]


_TABLE_ROWS = (
    ("challenge_dice", "Challenge Dice (mean per image, 1 if both empty)"),
    ("mean_iou", "Mean IoU per image"),
    ("dice_positive", "Dice on positive images"),
    ("pixel_dice", "Pixel Dice (pooled)"),
    ("pixel_iou", "Pixel IoU (pooled)"),
    ("pixel_precision", "Pixel precision"),
    ("pixel_recall", "Pixel recall"),
    ("pixel_accuracy", "Pixel accuracy"),
    ("pixel_f1", "Pixel F1"),
    ("image_auc", "Image AUC (max probability)"),
    ("image_sensitivity", "Image sensitivity"),
    ("image_specificity", "Image specificity"),
    ("image_accuracy", "Image accuracy"),
)


def pixel_table(metrics: dict[str, Any]) -> list[str]:
    """The U-Net seed's PTX-498 table (pixel level, pooled) for the served inference mode."""
    mode = metrics["served_mode"]
    values = metrics[mode]
    split = metrics["subset"]["split"]
    return [
        f"pixel level, pooled over {values['n_images']} images ({split} split, {metrics['resolution']} grid, "
        f"{'hflip TTA' if mode == 'tta' else 'no TTA'}):",
        f"  Dice (F1) {format_value(values['pixel_dice'])}  IoU {format_value(values['pixel_iou'])}  "
        f"precision {format_value(values['pixel_precision'])}  recall {format_value(values['pixel_recall'])}  "
        f"accuracy {format_value(values['pixel_accuracy'])}",
    ]


def headline(metrics: dict[str, Any]) -> list[str]:
    """What the CLI prints: the pixel-level table for PTX-498, the challenge metric otherwise."""
    if metrics["data"]["layout"] == Layout.PTX498.value:
        return pixel_table(metrics)
    tta, plain = metrics["tta"], metrics["plain"]
    return [f"challenge Dice ({metrics['subset']['split']} split, {tta['n_images']} images): "
            f"plain {plain['challenge_dice']:.4f}, hflip TTA {tta['challenge_dice']:.4f}; "
            f"served: {'hflip TTA' if metrics['served_mode'] == 'tta' else 'no TTA'}"]


def _write_report(out_dir: Path, metrics: dict[str, Any], figures: dict[str, Path]) -> Path:
    model = metrics["model"]
    split = metrics["subset"]["split"]
    by_mode = metrics["postprocess_by_mode"]
    lines = [
        f"# Evaluation: {model['name']} {model['version']}",
        "",
        f"- checkpoint: `{metrics['checkpoint']}` (weights sha256 `{model['weights_sha256'][:16]}...`)",
        f"- data: {metrics['data']['layout']} at `{metrics['data']['root']}`, "
        f"{metrics['subset']['n_images']} images ({metrics['tta']['n_positive']} with pneumothorax)",
        f"- **every number below comes from the {split} split**"
        + (" (no split file: every labelled image)" if split == "all" else ""),
        f"- post-processing, each tuned on validation for its own mode: plain `{json.dumps(by_mode['plain'], sort_keys=True)}`, "
        f"TTA `{json.dumps(by_mode['tta'], sort_keys=True)}`; the checkpoint serves "
        f"{'hflip TTA' if metrics['served_mode'] == 'tta' else 'no TTA'}",
        f"- pixels counted on the {metrics['resolution']} grid; [metrics.json](metrics.json), [per_image.json](per_image.json)",
        "",
        f"| metric ({split} split) | plain | hflip TTA |",
        "|---|---|---|",
    ]
    for key, label in _TABLE_ROWS:
        lines.append(f"| {label} | {format_value(metrics['plain'][key])} | {format_value(metrics['tta'][key])} |")
    (tn, fp), (fn, tp) = metrics["tta"]["confusion_matrix"]
    (ptn, pfp), (pfn, ptp) = metrics[metrics["served_mode"]]["pixel_confusion_matrix"]
    lines += ["", f"Confusion matrix (TTA, image level): TN {tn}, FP {fp}, FN {fn}, TP {tp}.",
              f"Pixel confusion matrix ({metrics['served_mode']}): TN {ptn}, FP {pfp}, FN {pfn}, TP {ptp}.", ""]
    titles = {"confusion_matrix": "Confusion matrix (image level)", "tta_vs_plain": "TTA vs plain",
              "pixel_confusion_matrix": "Pixel confusion matrix",
              "montage": "Input / ground truth / prediction", "curves": "Training curves per fold"}
    for key, path in figures.items():
        lines += [f"## {titles[key]}", "", f"![{titles[key]}]({path.name})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report

"""Figures for training and evaluation reports (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: training machines have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "MontageExample",
    "plot_confusion_matrix",
    "plot_curves",
    "plot_montage",
    "plot_tta_comparison",
]


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(histories: Mapping[int, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Loss (train and validation) and validation Dice/IoU per epoch, one line per fold."""
    fig, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for fold, history in sorted(histories.items()):
        epochs = [row["epoch"] + 1 for row in history]
        loss_axis.plot(epochs, [row["train_loss"] for row in history], marker="o", ms=3, label=f"fold {fold} train")
        loss_axis.plot(epochs, [row["val_loss"] for row in history], ls="--", marker="o", ms=3, label=f"fold {fold} val")
        metric_axis.plot(epochs, [row["val_dice"] for row in history], marker="o", ms=3, label=f"fold {fold} Dice")
        metric_axis.plot(epochs, [row["val_iou"] for row in history], ls="--", marker="o", ms=3, label=f"fold {fold} IoU")
    loss_axis.set(title="Loss", xlabel="epoch", ylabel="loss")
    metric_axis.set(title="Validation (threshold 0.5, network grid)", xlabel="epoch", ylabel="score", ylim=(0, 1))
    for axis in (loss_axis, metric_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return _save(fig, Path(path))


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], path: str | Path, title: str = "Image level", *, normalize: bool = False
) -> Path:
    """2x2 [[TN, FP], [FN, TP]] with counts; ``normalize`` adds each row's share (pixels:
    the counts span orders of magnitude)."""
    values = np.asarray(matrix, dtype=np.int64)
    rows = values.sum(1, keepdims=True)
    shares = values / np.where(rows == 0, 1, rows)
    fig, axis = plt.subplots(figsize=(4.4, 3.8))
    axis.imshow(shares if normalize else values, cmap="Blues", vmin=0)
    peak = 1.0 if normalize else values.max()
    for (row, col), value in np.ndenumerate(values):
        shown = shares[row, col] if normalize else value
        color = "white" if shown > peak / 2 else "black"
        text = f"{value:,}\n{100 * shares[row, col]:.2f}%" if normalize else str(value)
        axis.text(col, row, text, ha="center", va="center", color=color, fontsize=11 if normalize else 13)
    axis.set_xticks([0, 1], ["no PTX", "PTX"])
    axis.set_yticks([0, 1], ["no PTX", "PTX"])
    axis.set(xlabel="predicted", ylabel="truth", title=title)
    return _save(fig, Path(path))


@dataclass
class MontageExample:
    image: np.ndarray  # (H, W) display pixels in [0, 1]
    truth: np.ndarray  # bool (H, W)
    prediction: np.ndarray  # bool (H, W)
    title: str


def _overlay(axis: Any, image: np.ndarray, mask: np.ndarray, color: str) -> None:
    axis.imshow(image, cmap="gray", vmin=0, vmax=1)
    if mask.any():
        rgba = np.zeros((*mask.shape, 4))
        rgba[mask] = matplotlib.colors.to_rgba(color, 0.45)
        axis.imshow(rgba)
        axis.contour(mask, levels=[0.5], colors=color, linewidths=0.8)
    axis.axis("off")


def plot_montage(examples: Sequence[MontageExample], path: str | Path) -> Path:
    """Rows of input / ground truth / prediction, like the seeds' figures."""
    if not examples:
        raise ValueError("A montage needs at least one example.")
    fig, axes = plt.subplots(len(examples), 3, figsize=(9, 3 * len(examples)), squeeze=False)
    for row, example in enumerate(examples):
        axes[row, 0].imshow(example.image, cmap="gray", vmin=0, vmax=1)
        axes[row, 0].axis("off")
        axes[row, 0].set_title(example.title, fontsize=8)
        _overlay(axes[row, 1], example.image, example.truth, "lime")
        _overlay(axes[row, 2], example.image, example.prediction, "red")
    axes[0, 1].set_title("ground truth", fontsize=9)
    axes[0, 2].set_title("prediction", fontsize=9)
    return _save(fig, Path(path))


def plot_tta_comparison(
    plain: Mapping[str, Any],
    tta: Mapping[str, Any],
    dice_plain: np.ndarray,
    dice_tta: np.ndarray,
    path: str | Path,
) -> Path:
    """Key metrics side by side, and per-image Dice with TTA against without."""
    keys = [k for k in ("challenge_dice", "mean_iou", "pixel_precision", "pixel_recall", "pixel_f1",
                        "image_auc", "image_sensitivity", "image_specificity") if plain.get(k) is not None]
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = np.arange(len(keys))
    bars.bar(x - 0.2, [plain[k] for k in keys], 0.4, label="plain")
    bars.bar(x + 0.2, [tta[k] or 0 for k in keys], 0.4, label="hflip TTA")
    bars.set_xticks(x, [k.replace("_", "\n") for k in keys], fontsize=7)
    bars.set(ylim=(0, 1.05), title="Metrics: plain vs TTA")
    bars.legend()
    bars.grid(axis="y", alpha=0.3)
    scatter.scatter(dice_plain, dice_tta, s=8, alpha=0.6)
    scatter.plot([0, 1], [0, 1], color="gray", lw=0.8)
    scatter.set(xlabel="Dice plain", ylabel="Dice TTA", title="Per-image Dice", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    return _save(fig, Path(path))

"""Segmentation and detection metrics: the SIIM-ACR challenge metric and the seeds' tables.

All functions take numpy arrays: masks ``(N, H, W)`` (or a list of ``(H, W)`` masks of
differing shapes) and image-level scores ``(N,)``. No torch here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ImageStats",
    "MetricAccumulator",
    "SegmentationMetrics",
    "dice_per_image",
    "image_auc",
    "image_stats",
    "iou_per_image",
]


@dataclass(frozen=True)
class ImageStats:
    """Pixel counts of one image: prediction vs truth."""

    true_positive: int
    false_positive: int
    false_negative: int
    true_negative: int

    @property
    def dice(self) -> float:
        """Challenge Dice: 1 when prediction and truth are both empty."""
        denominator = 2 * self.true_positive + self.false_positive + self.false_negative
        return 1.0 if denominator == 0 else 2.0 * self.true_positive / denominator

    @property
    def iou(self) -> float:
        denominator = self.true_positive + self.false_positive + self.false_negative
        return 1.0 if denominator == 0 else self.true_positive / denominator


def image_stats(prediction: np.ndarray, truth: np.ndarray) -> ImageStats:
    """Pixel confusion counts of one ``(H, W)`` mask pair."""
    if prediction.shape != truth.shape:
        raise ValueError(
            f"Prediction shape {prediction.shape} differs from truth shape {truth.shape}."
        )
    predicted = prediction.astype(bool, copy=False)
    actual = truth.astype(bool, copy=False)
    true_positive = int(np.count_nonzero(predicted & actual))
    predicted_count = int(np.count_nonzero(predicted))
    actual_count = int(np.count_nonzero(actual))
    false_positive = predicted_count - true_positive
    false_negative = actual_count - true_positive
    true_negative = predicted.size - true_positive - false_positive - false_negative
    return ImageStats(true_positive, false_positive, false_negative, true_negative)


def _pairs(predictions: Sequence[np.ndarray] | np.ndarray, truths: Sequence[np.ndarray] | np.ndarray):
    if len(predictions) != len(truths):
        raise ValueError(f"Got {len(predictions)} predictions for {len(truths)} truth masks.")
    return zip(predictions, truths, strict=True)


def dice_per_image(predictions: Sequence[np.ndarray] | np.ndarray, truths: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Challenge Dice per image (1 when both masks are empty); the metric is its mean."""
    return np.array([image_stats(p, t).dice for p, t in _pairs(predictions, truths)], np.float64)


def iou_per_image(predictions: Sequence[np.ndarray] | np.ndarray, truths: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    return np.array([image_stats(p, t).iou for p, t in _pairs(predictions, truths)], np.float64)


def image_auc(scores: Iterable[float], labels: Iterable[bool]) -> float | None:
    """ROC AUC (Mann-Whitney, ties count half); None when one class is missing."""
    score_array = np.asarray(list(scores), dtype=np.float64)
    label_array = np.asarray(list(labels), dtype=bool)
    n_positive = int(label_array.sum())
    n_negative = label_array.size - n_positive
    if n_positive == 0 or n_negative == 0:
        return None
    order = np.argsort(score_array, kind="mergesort")
    sorted_scores = score_array[order]
    ranks = np.empty(score_array.size, dtype=np.float64)
    # Average ranks over ties.
    unique, first_index, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average_rank = first_index + (counts + 1) / 2.0
    ranks[order] = np.repeat(average_rank, counts)
    rank_sum = ranks[label_array].sum()
    return float((rank_sum - n_positive * (n_positive + 1) / 2.0) / (n_positive * n_negative))


def _ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else float(numerator) / float(denominator)


@dataclass
class SegmentationMetrics:
    """Everything the evaluation reports, for one set and one inference setting."""

    n_images: int
    n_positive: int
    challenge_dice: float  # mean per-image Dice, 1 when both empty (SIIM-ACR metric)
    mean_iou: float  # mean per-image IoU, 1 when both empty
    dice_positive: float | None  # mean Dice over images with pneumothorax
    pixel_dice: float | None  # pooled over all pixels (= pixel F1)
    pixel_iou: float | None
    pixel_precision: float | None
    pixel_recall: float | None
    pixel_accuracy: float
    pixel_f1: float | None
    image_auc: float | None
    image_sensitivity: float | None
    image_specificity: float | None
    image_accuracy: float
    confusion_matrix: list[list[int]] = field(default_factory=list)  # images: [[TN, FP], [FN, TP]]
    pixel_confusion_matrix: list[list[int]] = field(default_factory=list)  # pixels: [[TN, FP], [FN, TP]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MetricAccumulator:
    """Accumulates images one at a time (any sizes), then reports :class:`SegmentationMetrics`."""

    def __init__(self) -> None:
        self.dice: list[float] = []
        self.iou: list[float] = []
        self.truth_positive: list[bool] = []
        self.predicted_positive: list[bool] = []
        self.scores: list[float] = []
        self._pixel = np.zeros(4, dtype=np.int64)

    def add(self, prediction: np.ndarray, truth: np.ndarray, score: float | None = None) -> ImageStats:
        stats = image_stats(prediction, truth)
        self.dice.append(stats.dice)
        self.iou.append(stats.iou)
        self.truth_positive.append(stats.true_positive + stats.false_negative > 0)
        self.predicted_positive.append(stats.true_positive + stats.false_positive > 0)
        # Without a probability, the binary decision is the score.
        self.scores.append(float(score) if score is not None else float(self.predicted_positive[-1]))
        self._pixel += np.array(
            [stats.true_positive, stats.false_positive, stats.false_negative, stats.true_negative]
        )
        return stats

    def result(self) -> SegmentationMetrics:
        if not self.dice:
            raise ValueError("No images were added; nothing to report.")
        tp, fp, fn, tn = (int(v) for v in self._pixel)
        truth = np.array(self.truth_positive)
        predicted = np.array(self.predicted_positive)
        image_tp = int(np.sum(truth & predicted))
        image_fp = int(np.sum(~truth & predicted))
        image_fn = int(np.sum(truth & ~predicted))
        image_tn = int(np.sum(~truth & ~predicted))
        dice = np.array(self.dice)
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, tp + fn)
        return SegmentationMetrics(
            n_images=len(dice),
            n_positive=int(truth.sum()),
            challenge_dice=float(dice.mean()),
            mean_iou=float(np.mean(self.iou)),
            dice_positive=float(dice[truth].mean()) if truth.any() else None,
            pixel_dice=_ratio(2 * tp, 2 * tp + fp + fn),
            pixel_iou=_ratio(tp, tp + fp + fn),
            pixel_precision=precision,
            pixel_recall=recall,
            pixel_accuracy=float((tp + tn) / max(tp + fp + fn + tn, 1)),
            pixel_f1=_ratio(2 * tp, 2 * tp + fp + fn),
            image_auc=image_auc(self.scores, self.truth_positive),
            image_sensitivity=_ratio(image_tp, image_tp + image_fn),
            image_specificity=_ratio(image_tn, image_tn + image_fp),
            image_accuracy=float((image_tp + image_tn) / len(dice)),
            confusion_matrix=[[image_tn, image_fp], [image_fn, image_tp]],
            pixel_confusion_matrix=[[tn, fp], [fn, tp]],
        )

"""Metrics on hand-made masks."""

from __future__ import annotations

import numpy as np
import pytest

from trainer import metrics


def square(shape: tuple[int, int], top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top : top + side, left : left + side] = True
    return mask


EMPTY = np.zeros((10, 10), bool)


def test_empty_empty_is_one_and_empty_vs_nonempty_is_zero() -> None:
    full = square((10, 10), 2, 2, 3)
    assert metrics.image_stats(EMPTY, EMPTY).dice == 1.0
    assert metrics.image_stats(EMPTY, EMPTY).iou == 1.0
    assert metrics.image_stats(full, EMPTY).dice == 0.0
    assert metrics.image_stats(EMPTY, full).dice == 0.0
    np.testing.assert_allclose(metrics.dice_per_image([EMPTY, full, EMPTY], [EMPTY, EMPTY, full]), [1, 0, 0])


def test_partial_overlap_values() -> None:
    truth = square((10, 10), 0, 0, 4)  # 16 px
    prediction = square((10, 10), 0, 2, 4)  # 16 px, overlap 4x2 = 8
    stats = metrics.image_stats(prediction, truth)
    assert (stats.true_positive, stats.false_positive, stats.false_negative) == (8, 8, 8)
    assert stats.true_negative == 100 - 24
    assert stats.dice == pytest.approx(2 * 8 / 32)
    assert stats.iou == pytest.approx(8 / 24)


def test_accumulator_reports_challenge_and_pixel_metrics() -> None:
    accumulator = metrics.MetricAccumulator()
    truth = square((10, 10), 0, 0, 4)
    accumulator.add(truth, truth, score=0.9)  # perfect positive
    accumulator.add(EMPTY, EMPTY, score=0.1)  # true negative
    accumulator.add(square((10, 10), 5, 5, 2), EMPTY, score=0.6)  # false positive image
    accumulator.add(EMPTY, truth, score=0.2)  # missed positive
    result = accumulator.result()
    assert result.n_images == 4 and result.n_positive == 2
    assert result.challenge_dice == pytest.approx(0.5)
    assert result.dice_positive == pytest.approx(0.5)
    assert result.confusion_matrix == [[1, 1], [1, 1]]
    assert result.image_sensitivity == pytest.approx(0.5)
    assert result.image_specificity == pytest.approx(0.5)
    # Pixels: TP 16, FP 4, FN 16.
    assert result.pixel_precision == pytest.approx(16 / 20)
    assert result.pixel_recall == pytest.approx(16 / 32)
    assert result.pixel_f1 == pytest.approx(32 / 52)
    assert result.pixel_accuracy == pytest.approx((400 - 20) / 400)
    # Scores rank: positives 0.9, 0.2 vs negatives 0.1, 0.6 -> 3 of 4 pairs ordered.
    assert result.image_auc == pytest.approx(0.75)


def test_auc_edge_cases() -> None:
    assert metrics.image_auc([0.1, 0.2], [False, False]) is None
    assert metrics.image_auc([0.5, 0.5], [True, False]) == pytest.approx(0.5)
    assert metrics.image_auc([0.9, 0.1, 0.8], [True, False, True]) == pytest.approx(1.0)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="differs from truth shape"):
        metrics.image_stats(np.zeros((4, 4)), np.zeros((5, 5)))
    with pytest.raises(ValueError, match="No images"):
        metrics.MetricAccumulator().result()

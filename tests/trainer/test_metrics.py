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


def test_pooled_and_per_image_disagree_as_the_papers_count_them() -> None:
    """A big well-found region and a small missed one: pooled Dice is high, mean per-image Dice is not."""
    big_truth = square((20, 20), 0, 0, 10)  # 100 px
    big_prediction = square((20, 20), 0, 0, 9)  # 81 px inside it
    small_truth = square((20, 20), 15, 15, 2)  # 4 px, missed
    accumulator = metrics.MetricAccumulator()
    accumulator.add(big_prediction, big_truth)
    accumulator.add(np.zeros((20, 20), bool), small_truth)
    accumulator.add(np.zeros((20, 20), bool), np.zeros((20, 20), bool))  # both empty: Dice 1 per image
    result = accumulator.result()
    assert result.challenge_dice == pytest.approx((2 * 81 / 181 + 0.0 + 1.0) / 3)
    assert result.pixel_dice == pytest.approx(2 * 81 / (81 + 104))  # TP 81, FP 0, FN 19 + 4
    assert result.pixel_iou == pytest.approx(81 / 104)
    assert result.pixel_confusion_matrix == [[3 * 400 - 104, 0], [23, 81]]
    assert result.pixel_accuracy == pytest.approx((1200 - 23) / 1200)
    # an all-empty set: every per-image score is 1, pooled ratios are undefined (None), not 0 or 1
    empty = metrics.MetricAccumulator()
    empty.add(np.zeros((4, 4), bool), np.zeros((4, 4), bool))
    only_empty = empty.result()
    assert only_empty.challenge_dice == 1.0 and only_empty.mean_iou == 1.0
    assert only_empty.pixel_dice is None and only_empty.pixel_precision is None and only_empty.pixel_recall is None
    assert only_empty.dice_positive is None and only_empty.image_auc is None


def test_threshold_search_objectives_pick_what_they_maximise() -> None:
    from trainer.config import ThresholdSearchOptions
    from trainer.thresholds import search_postprocess

    truth = np.zeros((2, 16, 16), bool)
    truth[0, 2:10, 2:10] = True  # one positive image, one negative
    probability = np.zeros((2, 16, 16), np.float32)
    probability[0, 2:10, 2:10] = 0.6
    probability[0, 1:11, 1:11] = np.maximum(probability[0, 1:11, 1:11], 0.1)  # a halo only a low threshold adds
    probability[1, 0:3, 0:3] = 0.2  # a faint false positive on the negative image
    scale = np.ones(2)
    per_image = search_postprocess(probability, truth, scale, ThresholdSearchOptions(
        objective="iou", thresholds=(0.05, 0.5), min_areas=(0,)))
    pooled = search_postprocess(probability, truth, scale, ThresholdSearchOptions(
        objective="pixel_iou", thresholds=(0.05, 0.5), min_areas=(0,)))
    assert per_image.config.threshold == 0.5 and per_image.score == pytest.approx(1.0)
    assert pooled.config.threshold == 0.5 and pooled.score == pytest.approx(1.0)
    at_low = next(row for row in pooled.table if row["threshold"] == 0.05)
    assert at_low["score"] == pytest.approx(64 / (100 + 9))  # pooled: halo and false positive in one union

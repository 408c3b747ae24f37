"""Post-processing search on hand-made probability maps."""

from __future__ import annotations

import numpy as np
import pytest

from model.postprocess import postprocess
from trainer.config import ThresholdSearchOptions
from trainer.metrics import dice_per_image
from trainer.thresholds import search_postprocess


def _maps() -> tuple[np.ndarray, np.ndarray]:
    """Image 0: true region at p=0.6 plus a small false blob at 0.9; image 1: empty truth, small blob."""
    probabilities = np.zeros((2, 64, 64), np.float32)
    truths = np.zeros((2, 64, 64), bool)
    truths[0, 10:30, 10:30] = True
    probabilities[0, 10:30, 10:30] = 0.6
    probabilities[0, 50:52, 50:52] = 0.9  # 4 px
    probabilities[1, 5:7, 5:7] = 0.9  # 4 px
    return probabilities, truths


def test_threshold_search_finds_threshold_and_min_area() -> None:
    probabilities, truths = _maps()
    scale = np.full(2, (1024 / 64) ** 2)  # one network pixel = 256 reference pixels
    options = ThresholdSearchOptions(mode="threshold", thresholds=(0.5, 0.7), min_areas=(0, 2000))
    result = search_postprocess(probabilities, truths, scale, options)
    # Threshold 0.5 keeps the true square; min area 2000 ref px (~8 net px) drops both 4 px blobs.
    assert result.config.threshold == 0.5 and result.config.min_area_px == 2000
    assert result.score == pytest.approx(1.0)
    assert len(result.table) == 4
    # The chosen config gives the same score through model.postprocess at this resolution.
    masks = [postprocess(p, result.config).mask for p in probabilities]
    assert dice_per_image(masks, truths).mean() == pytest.approx(result.score)


def test_triplet_search_gates_on_top_area() -> None:
    probabilities, truths = _maps()
    probabilities[0, 10:20, 10:30] = 0.8  # a confident core inside the true region (200 px)
    scale = np.ones(2)
    options = ThresholdSearchOptions(
        mode="triplet", top_thresholds=(0.75,), top_min_areas=(0, 100), bottom_thresholds=(0.3, 0.7)
    )
    result = search_postprocess(probabilities, truths, scale, options)
    assert result.config.mode == "triplet"
    assert (result.config.top_min_area_px, result.config.bottom_threshold) == (100, 0.3)
    # Image 0 keeps region + blob (404 px vs 400 true), image 1 is gated to empty (Dice 1).
    assert result.score == pytest.approx((2 * 400 / 804 + 1.0) / 2)


def test_search_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match=r"must both be \(N, S, S\)"):
        search_postprocess(np.zeros((2, 8, 8)), np.zeros((2, 4, 4), bool), np.ones(2), ThresholdSearchOptions())

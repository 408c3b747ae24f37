"""Binarization rules on hand-made probability maps."""

from __future__ import annotations

import numpy as np
import pytest

from model.postprocess import PostprocessConfig, PostprocessMode, postprocess


def _map(shape=(1024, 1024)) -> np.ndarray:
    prob = np.zeros(shape, np.float32)
    prob[100:140, 100:140] = 0.9  # 1600 px, confident
    prob[500:510, 500:510] = 0.6  # 100 px, small
    prob[800:830, 800:830] = 0.4  # 900 px, weak
    return prob


def test_threshold_mode_plain() -> None:
    pred = postprocess(_map(), PostprocessConfig(threshold=0.5), pixel_spacing_mm=(0.2, 0.1))
    expected = _map() > 0.5
    np.testing.assert_array_equal(pred.mask, expected)
    assert pred.area_px == 1700 and pred.n_components == 2 and pred.positive
    assert pred.area_mm2 == pytest.approx(1700 * 0.02)
    assert pred.score == pytest.approx(0.9)


def test_threshold_mode_removes_small_components() -> None:
    pred = postprocess(_map(), PostprocessConfig(threshold=0.5, min_area_px=200))
    assert pred.area_px == 1600 and pred.n_components == 1
    assert pred.mask[120, 120] and not pred.mask[505, 505]
    lower = postprocess(_map(), PostprocessConfig(threshold=0.3, min_area_px=200))
    assert lower.area_px == 1600 + 900 and lower.n_components == 2


def test_min_area_is_counted_at_the_reference_resolution() -> None:
    # The same picture at 2048: every region has 4x the pixels, and so has the limit.
    big = np.kron(_map(), np.ones((2, 2), np.float32))
    pred = postprocess(big, PostprocessConfig(threshold=0.5, min_area_px=200))
    assert pred.area_px == 4 * 1600 and pred.n_components == 1
    kept = postprocess(big, PostprocessConfig(threshold=0.5, min_area_px=99))
    assert kept.area_px == 4 * 1700


def test_diagonal_pixels_are_one_component() -> None:
    prob = np.zeros((64, 64), np.float32)
    prob[10, 10] = prob[11, 11] = prob[12, 12] = 1.0
    pred = postprocess(prob, PostprocessConfig(threshold=0.5))
    assert pred.n_components == 1 and pred.area_px == 3


def test_triplet_mode() -> None:
    cfg = PostprocessConfig(mode="triplet", top_threshold=0.75, top_min_area_px=1000, bottom_threshold=0.3)
    pred = postprocess(_map(), cfg)
    # 1600 px above 0.75 >= 1000: keep, binarized at 0.3 (all three regions).
    np.testing.assert_array_equal(pred.mask, _map() > 0.3)
    assert pred.n_components == 3 and pred.area_px == 1600 + 100 + 900
    strict = postprocess(_map(), PostprocessConfig(mode="triplet", top_min_area_px=2000))
    assert not strict.positive and strict.area_px == 0 and strict.n_components == 0
    assert strict.score == pytest.approx(0.9)  # the score survives an empty mask
    weak = _map() * 0.7  # nothing reaches the top threshold
    assert not postprocess(weak, PostprocessConfig(mode="triplet", top_min_area_px=0)).positive


def test_empty_map() -> None:
    pred = postprocess(np.zeros((32, 32), np.float32), PostprocessConfig(), pixel_spacing_mm=None)
    assert not pred.positive and pred.area_px == 0 and pred.area_mm2 is None and pred.score == 0.0


def test_config_validation_and_round_trip() -> None:
    cfg = PostprocessConfig(mode="triplet", top_min_area_px=1200)
    assert cfg.mode is PostprocessMode.TRIPLET
    assert PostprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["mode"] == "triplet"
    with pytest.raises(ValueError, match="mode must be one of threshold, triplet"):
        PostprocessConfig(mode="otsu")
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\]"):
        PostprocessConfig(threshold=1.5)
    with pytest.raises(ValueError, match="min_area_px must be a non-negative integer"):
        PostprocessConfig(min_area_px=-1)
    with pytest.raises(ValueError, match="bottom_threshold must not exceed top_threshold"):
        PostprocessConfig(top_threshold=0.3, bottom_threshold=0.5)
    with pytest.raises(ValueError, match="Unknown post-processing parameters: leak"):
        PostprocessConfig.from_dict({"leak": 1})

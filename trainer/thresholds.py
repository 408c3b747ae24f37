"""Post-processing search on validation predictions: threshold + minimum area, or triplet.

Runs on the network grid (fast) with each image's areas converted to model.postprocess's
1024x1024 reference pixels, so the chosen :class:`PostprocessConfig` means the same on the
source grid where the node applies it (up to resampling of component borders).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from model.postprocess import PostprocessConfig, PostprocessMode
from trainer.config import SearchObjective, ThresholdSearchOptions

__all__ = ["SearchResult", "search_postprocess"]


@dataclass
class SearchResult:
    config: PostprocessConfig
    score: float  # the objective on the searched images
    mode: PostprocessMode
    n_images: int
    table: list[dict[str, Any]] = field(default_factory=list)  # every grid point, best first
    objective: SearchObjective = SearchObjective.DICE

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "score": self.score,
            "objective": self.objective.value,
            "mode": self.mode.value,
            "n_images": self.n_images,
            "top": self.table[:10],
        }


def _dice(intersection: np.ndarray, predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    denominator = predicted + truth
    safe = np.where(denominator == 0, 1, denominator)
    return np.where(denominator == 0, 1.0, 2.0 * intersection / safe)


def _score(objective: SearchObjective, intersection: np.ndarray, predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Objective per grid point from per-image pixel counts (..., N) -> (...)."""
    truth = np.broadcast_to(truth, intersection.shape)
    if objective is SearchObjective.DICE:
        return _dice(intersection, predicted, truth).mean(-1)
    union = predicted + truth - intersection
    if objective is SearchObjective.IOU:
        return np.where(union == 0, 1.0, intersection / np.where(union == 0, 1, union)).mean(-1)
    pooled_union = union.sum(-1)
    return np.where(pooled_union == 0, 1.0, intersection.sum(-1) / np.where(pooled_union == 0, 1, pooled_union))


def _check_inputs(probabilities: np.ndarray, truths: np.ndarray, ref_scale: np.ndarray) -> None:
    if probabilities.ndim != 3 or probabilities.shape != truths.shape:
        raise ValueError(
            f"Probabilities {probabilities.shape} and truths {truths.shape} must both be (N, S, S)."
        )
    if ref_scale.shape != (probabilities.shape[0],):
        raise ValueError(f"Need one area scale per image, got {ref_scale.shape}.")
    if probabilities.shape[0] == 0:
        raise ValueError("Threshold search needs at least one validation image.")


def _search_threshold(probabilities, truths, ref_scale, options, objective) -> list[dict[str, Any]]:
    areas = np.array(sorted(set(options.min_areas)), dtype=np.float64)
    truth_sum = truths.reshape(len(truths), -1).sum(1).astype(np.float64)
    table = []
    for threshold in options.thresholds:
        intersection = np.zeros((len(areas), len(truths)))
        predicted = np.zeros((len(areas), len(truths)))
        for i, (probability, truth) in enumerate(zip(probabilities, truths, strict=True)):
            binary = (probability > threshold).astype(np.uint8)
            if not binary.any():
                continue
            count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
            component_area = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
            component_hit = np.bincount(labels[truth], minlength=count)[1:].astype(np.float64)
            # model.postprocess keeps components with area >= min area (min area <= 1 keeps all).
            keep = (component_area[None, :] * ref_scale[i] >= areas[:, None]) | (areas[:, None] <= 1)
            intersection[:, i] = keep @ component_hit
            predicted[:, i] = keep @ component_area
        scores = _score(objective, intersection, predicted, truth_sum[None, :])
        for area, score in zip(areas, scores, strict=True):
            table.append(
                {"score": float(score), "config": PostprocessConfig(
                    mode=PostprocessMode.THRESHOLD, threshold=float(threshold), min_area_px=int(area)
                )}
            )
    return table


def _search_triplet(probabilities, truths, ref_scale, options, objective) -> list[dict[str, Any]]:
    flat_probability = probabilities.reshape(len(probabilities), -1)
    flat_truth = truths.reshape(len(truths), -1)
    truth_sum = flat_truth.sum(1).astype(np.float64)
    bottom_stats = {}
    for bottom in options.bottom_thresholds:
        binary = flat_probability > bottom
        bottom_stats[bottom] = (
            (binary & flat_truth).sum(1).astype(np.float64),
            binary.sum(1).astype(np.float64),
        )
    table = []
    for top in options.top_thresholds:
        top_area = (flat_probability > top).sum(1) * ref_scale
        for min_area in options.top_min_areas:
            gate = (top_area > 0) & (top_area >= min_area)
            for bottom in options.bottom_thresholds:
                if bottom > top:
                    continue
                intersection, predicted = bottom_stats[bottom]
                # an image failing the gate is predicted empty
                score = _score(objective, np.where(gate, intersection, 0.0), np.where(gate, predicted, 0.0), truth_sum)
                table.append(
                    {"score": float(score), "config": PostprocessConfig(
                        mode=PostprocessMode.TRIPLET,
                        top_threshold=float(top),
                        top_min_area_px=int(min_area),
                        bottom_threshold=float(bottom),
                    )}
                )
    if not table:
        raise ValueError("Triplet search grid is empty: every bottom threshold exceeds every top threshold.")
    return table


def search_postprocess(
    probabilities: np.ndarray,
    truths: np.ndarray,
    ref_px_per_net_px: np.ndarray,
    options: ThresholdSearchOptions,
) -> SearchResult:
    """Pick the grid point with the best ``options.objective`` (earliest wins ties)."""
    truths = truths.astype(bool, copy=False)
    ref_scale = np.asarray(ref_px_per_net_px, dtype=np.float64)
    _check_inputs(probabilities, truths, ref_scale)
    mode = PostprocessMode(options.mode)
    search = _search_threshold if mode is PostprocessMode.THRESHOLD else _search_triplet
    objective = SearchObjective(options.objective)
    table = search(probabilities, truths, ref_scale, options, objective)
    ranked = sorted(table, key=lambda row: -row["score"])  # stable: grid order breaks ties
    best = ranked[0]
    rows = [{"score": row["score"], **row["config"].to_dict()} for row in ranked]
    return SearchResult(best["config"], best["score"], mode, len(truths), rows, objective)

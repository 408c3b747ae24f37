"""Markdown reports that link the figures."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer import plots

if TYPE_CHECKING:
    from trainer.config import TrainConfig
    from trainer.training import FoldResult

__all__ = ["format_value", "write_training_report"]


def format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _test_table(what: str, test: dict[str, Any], folder: str) -> list[str]:
    lines = [f"## Test split ({what}, {test['tta']['n_images']} images no choice was made on)", "",
             "| metric (test split) | plain | hflip TTA |", "|---|---|---|"]
    for key in ("challenge_dice", "pixel_dice", "pixel_iou", "pixel_precision", "pixel_recall", "pixel_accuracy",
                "image_auc", "image_sensitivity", "image_specificity"):
        lines.append(f"| {key} | {format_value(test['plain'][key])} | {format_value(test['tta'][key])} |")
    return lines + ["", f"Served: {'hflip TTA' if test['served_mode'] == 'tta' else 'no TTA'}; "
                    f"full report: [{folder}/report.md]({folder}/report.md)", ""]


def write_training_report(
    out_dir: Path, config: TrainConfig, results: list[FoldResult], summary: dict[str, Any]
) -> Path:
    curves = plots.plot_curves({r.fold: r.history for r in results if r.history}, out_dir / "curves.png") if any(
        r.history for r in results
    ) else None
    lines = [
        f"# Training report: {config.name}",
        "",
        config.description,
        "",
        f"- architecture: {config.network.architecture} / {config.network.encoder}, "
        f"input {config.input_size} px, encoder init {config.network.encoder_weights}",
        f"- split: {config.split.kind}, monitor: val {config.early_stopping.monitor.value} "
        f"(patience {config.early_stopping.patience})",
        "- served checkpoint: [checkpoint/](checkpoint/manifest.json)",
        "",
        f"| fold | best epoch | best monitored | steps | validation {config.threshold_search.objective.value} "
        "(threshold search) | post-processing |",
        "|---|---|---|---|---|---|",
    ]
    for fold in summary["folds"]:
        post = fold["postprocess"] or {}
        post_text = (
            f"threshold {post.get('threshold')}, min area {post.get('min_area_px')}"
            if post.get("mode") == "threshold"
            else f"triplet top {post.get('top_threshold')} / area {post.get('top_min_area_px')} / "
            f"bottom {post.get('bottom_threshold')}"
        ) if post else "n/a"
        lines.append(
            f"| {fold['fold']} | {fold['best_epoch']} | {format_value(fold['best_value'])} | {fold['steps']} | "
            f"{format_value(fold['searched_dice'])} | {post_text} |"
        )
    lines += ["", f"Validation (cross-validation mean over folds) {config.threshold_search.objective.value} after "
              f"threshold search: {format_value(summary['cv_searched_dice_mean'])} "
              f"(std {format_value(summary['cv_searched_dice_std'])}); the served fold is chosen on it.", ""]
    ensemble = summary.get("ensemble")
    if ensemble:
        tuned = ensemble["postprocess_tuned_on"]
        where = (f"searched on the tune split ({tuned['n_images']} images no member trained or validated on), "
                 f"{config.threshold_search.objective.value} {format_value(ensemble.get('tune_searched_score'))}"
                 if tuned["split"] == "tune" else
                 f"reused from fold {tuned['reused_from_fold']}'s validation search, not tuned for the ensemble "
                 "(no tune split)")
        lines += [f"## Fold ensemble: [ensemble/](ensemble/manifest.json), folds "
                  f"{', '.join(map(str, ensemble['member_folds']))}", "",
                  f"Combined as the {ensemble['combine']}; post-processing {where}.", ""]
    test = summary.get("test")
    if test:
        lines += _test_table("served checkpoint", test, "test-evaluation")
        if summary.get("ensemble_test"):
            lines += _test_table("fold ensemble", summary["ensemble_test"], "test-evaluation-ensemble")
    else:
        lines += ["No test split (split.test_fraction = 0): the numbers above are validation numbers.", ""]
    if curves is not None:
        lines += ["## Curves", "", "![loss and metric curves](curves.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path

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
        "| fold | best epoch | best monitored | steps | val Dice (search) | post-processing |",
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
    lines += ["", f"Cross-validation mean searched Dice: {format_value(summary['cv_searched_dice_mean'])} "
              f"(std {format_value(summary['cv_searched_dice_std'])})", ""]
    if curves is not None:
        lines += ["## Curves", "", "![loss and metric curves](curves.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path

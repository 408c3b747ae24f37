"""Segmentation losses: weighted BCE + soft Dice (+ focal), on logits, in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import LossOptions

__all__ = ["ComboLoss"]


class ComboLoss(nn.Module):
    """``bce_weight * BCE(pos_weight) + dice_weight * (1 - soft Dice) + focal_weight * focal``.

    Soft Dice is pooled over the batch (as segmentation-models-pytorch's binary DiceLoss),
    which stays defined on batches without any positive pixel.
    """

    def __init__(self, options: LossOptions, smooth: float = 1.0) -> None:
        super().__init__()
        self.options = options
        self.smooth = smooth
        self.register_buffer("pos_weight", torch.tensor([options.pos_weight]), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(
                f"Logits shape {tuple(logits.shape)} differs from target shape {tuple(target.shape)}."
            )
        logits = logits.float()
        target = target.float()
        options = self.options
        total = logits.new_zeros(())
        if options.bce_weight:
            bce = F.binary_cross_entropy_with_logits(
                logits, target, pos_weight=self.pos_weight.to(logits.device)
            )
            total = total + options.bce_weight * bce
        if options.dice_weight or options.focal_weight:
            probability = torch.sigmoid(logits)
        if options.dice_weight:
            intersection = (probability * target).sum()
            dice = (2 * intersection + self.smooth) / (probability.sum() + target.sum() + self.smooth)
            total = total + options.dice_weight * (1 - dice)
        if options.focal_weight:
            plain_bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            p_true = torch.where(target > 0.5, probability, 1 - probability)
            focal = ((1 - p_true) ** options.focal_gamma * plain_bce).mean()
            total = total + options.focal_weight * focal
        return total

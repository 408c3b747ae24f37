"""Augmentations that run on the training device, per sample, on whole batches."""

from __future__ import annotations

import torch

from trainer.config import AugmentOptions

__all__ = ["DeviceAugment"]


class DeviceAugment:
    """Horizontal flip and brightness/contrast on ``(N, 1, S, S)`` batches, in torch.

    Brightness and contrast act around each image's own mean and in units of its own
    standard deviation, so they mean the same whatever normalization preprocessing used.
    """

    def __init__(self, options: AugmentOptions) -> None:
        if not isinstance(options, AugmentOptions):
            raise TypeError("DeviceAugment needs AugmentOptions.")
        self.options = options

    def __call__(
        self, images: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or images.shape != masks.shape:
            raise ValueError(
                f"Expected images and masks of one shape (N, 1, S, S), got {tuple(images.shape)} "
                f"and {tuple(masks.shape)}."
            )
        options = self.options
        n = images.shape[0]
        device = images.device
        if options.hflip_p > 0:
            flip = (torch.rand(n, device=device) < options.hflip_p).view(n, 1, 1, 1)
            images = torch.where(flip, images.flip(-1), images)
            masks = torch.where(flip, masks.flip(-1), masks)
        if options.brightness_contrast_p > 0:
            apply = (torch.rand(n, device=device) < options.brightness_contrast_p).view(n, 1, 1, 1)
            mean = images.mean(dim=(1, 2, 3), keepdim=True)
            std = images.std(dim=(1, 2, 3), keepdim=True)
            alpha = 1.0 + (torch.rand(n, 1, 1, 1, device=device) * 2 - 1) * options.contrast
            beta = (torch.rand(n, 1, 1, 1, device=device) * 2 - 1) * options.brightness
            adjusted = (images - mean) * alpha + mean + beta * std
            images = torch.where(apply, adjusted, images)
        return images, masks

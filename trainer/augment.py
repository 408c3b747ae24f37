"""Training augmentations from well-kept libraries, image and mask transformed identically.

- :class:`DeviceAugment`: kornia's augmentation module on whole ``(N, 1, S, S)`` batches on
  the training device (flip, affine, resized crop, elastic "bending", Gaussian noise), then
  brightness/contrast in units of each image's own standard deviation.
- :class:`HostAugment`: albumentations per sample on the batch source's loader threads, for
  what kornia lacks (optical distortion, the U-Net seed's).

Masks come out exactly 0/1: geometric transforms resample them, then they are re-binarized.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

from trainer.config import AugmentOptions

__all__ = ["DeviceAugment", "HostAugment", "build_augmentations"]

# albumentations asks PyPI for a newer version at import; training boxes may be offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


class DeviceAugment:
    """kornia batch transforms (same parameters for image and mask) + brightness/contrast."""

    def __init__(self, options: AugmentOptions, input_size: int | None = None) -> None:
        if not isinstance(options, AugmentOptions):
            raise TypeError("DeviceAugment needs AugmentOptions.")
        self.options = options
        self.pipeline = self._kornia_pipeline(options, input_size)

    @staticmethod
    def _kornia_pipeline(options: AugmentOptions, input_size: int | None):
        transforms = []
        import kornia.augmentation as K

        if options.hflip_p > 0:
            transforms.append(K.RandomHorizontalFlip(p=options.hflip_p))
        if options.affine_p > 0:
            transforms.append(K.RandomAffine(
                degrees=options.affine_degrees, translate=(options.affine_translate, options.affine_translate),
                scale=tuple(options.affine_scale), padding_mode="border", p=options.affine_p,
            ))
        if options.crop_p > 0:
            if input_size is None:
                raise ValueError("A random resized crop needs the input size.")
            transforms.append(K.RandomResizedCrop(
                (input_size, input_size), scale=tuple(options.crop_scale), ratio=(0.9, 1.1), p=options.crop_p,
            ))
        if options.elastic_p > 0:
            kernel = 2 * int(3 * options.elastic_sigma) + 1  # the Gaussian's +-3 sigma support
            transforms.append(K.RandomElasticTransform(
                kernel_size=(kernel, kernel), sigma=(options.elastic_sigma, options.elastic_sigma),
                alpha=(options.elastic_alpha, options.elastic_alpha), padding_mode="border", p=options.elastic_p,
            ))
        if options.noise_p > 0:
            transforms.append(K.RandomGaussianNoise(std=options.noise_std, p=options.noise_p))
        if not transforms:
            return None
        return K.AugmentationSequential(*transforms, data_keys=["input", "mask"])

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or images.shape != masks.shape:
            raise ValueError(
                f"Expected images and masks of one shape (N, 1, S, S), got {tuple(images.shape)} "
                f"and {tuple(masks.shape)}."
            )
        options = self.options
        if self.pipeline is not None:
            images, masks = self.pipeline(images, masks)
            masks = (masks > 0.5).to(images.dtype)
        if options.brightness_contrast_p > 0:
            n, device = images.shape[0], images.device
            apply = (torch.rand(n, device=device) < options.brightness_contrast_p).view(n, 1, 1, 1)
            mean = images.mean(dim=(1, 2, 3), keepdim=True)
            std = images.std(dim=(1, 2, 3), keepdim=True)
            alpha = 1.0 + (torch.rand(n, 1, 1, 1, device=device) * 2 - 1) * options.contrast
            beta = (torch.rand(n, 1, 1, 1, device=device) * 2 - 1) * options.brightness
            adjusted = (images - mean) * alpha + mean + beta * std
            images = torch.where(apply, adjusted, images)
        return images, masks


class HostAugment:
    """albumentations per sample: ``(image float32 (S, S), mask uint8 (S, S))`` in and out.

    One pipeline per loader thread: albumentations pipelines hold their own random state.
    """

    def __init__(self, options: AugmentOptions, seed: int = 0) -> None:
        if options.optical_distortion_p <= 0:
            raise ValueError("HostAugment has nothing to do: optical_distortion_p is 0.")
        self.options = options
        self.seed = seed
        self._local = threading.local()
        self._lock = threading.Lock()
        self._threads = 0

    def _pipeline(self):
        pipeline = getattr(self._local, "pipeline", None)
        if pipeline is None:
            import albumentations as A
            import cv2

            with self._lock:
                self._threads += 1
                offset = self._threads
            pipeline = A.Compose([
                A.OpticalDistortion(distort_limit=self.options.optical_distortion_limit,
                                    border_mode=cv2.BORDER_REFLECT_101, p=self.options.optical_distortion_p),
            ], seed=self.seed * 1009 + offset)
            self._local.pipeline = pipeline
        return pipeline

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self._pipeline()(image=np.ascontiguousarray(image, np.float32), mask=np.ascontiguousarray(mask))
        return out["image"], (out["mask"] > 0).astype(np.uint8)


def build_augmentations(
    options: AugmentOptions, input_size: int, seed: int = 0
) -> tuple[HostAugment | None, DeviceAugment]:
    """The recipe's host-side (None when it needs none) and device-side augmentations."""
    host = HostAugment(options, seed) if options.optical_distortion_p > 0 else None
    return host, DeviceAugment(options, input_size)

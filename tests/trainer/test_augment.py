"""Augmentations: every geometric transform moves image and mask together; intensity ones leave masks alone."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from trainer.augment import DeviceAugment, HostAugment, build_augmentations
from trainer.config import AugmentOptions, load_config

SIZE = 64


def _shapes(n: int = 6, seed: int = 0) -> torch.Tensor:
    """Off-centre ellipses of varied size: any misalignment shows."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 1, SIZE, SIZE), np.float32)
    for i in range(n):
        center = (int(rng.integers(16, 48)), int(rng.integers(16, 48)))
        axes = (int(rng.integers(5, 14)), int(rng.integers(5, 14)))
        cv2.ellipse(masks[i, 0], center, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    return torch.from_numpy(masks)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


GEOMETRIC = {
    "hflip": {"hflip_p": 1.0},
    "affine": {"hflip_p": 0.0, "affine_p": 1.0, "affine_degrees": 40.0, "affine_translate": 0.1,
               "affine_scale": (0.8, 1.2)},
    "crop": {"hflip_p": 0.0, "crop_p": 1.0, "crop_scale": (0.5, 0.7)},
    "elastic": {"hflip_p": 0.0, "elastic_p": 1.0, "elastic_alpha": 4.0, "elastic_sigma": 6.0},
}


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_kornia_transform_keeps_image_and_mask_aligned(name: str) -> None:
    torch.manual_seed(1)
    masks = _shapes()
    images = masks.clone() * 2.0 - 1.0  # the image is the mask: after the warp they must still agree
    out_images, out_masks = DeviceAugment(AugmentOptions(**GEOMETRIC[name]), SIZE)(images, masks)
    assert out_images.shape == images.shape and out_masks.shape == masks.shape
    assert set(torch.unique(out_masks).tolist()) <= {0.0, 1.0}
    moved = 0
    for i in range(len(masks)):
        warped_image = out_images[i, 0].numpy() > 0.0
        warped_mask = out_masks[i, 0].numpy() > 0.5
        assert _iou(warped_image, warped_mask) > 0.9, f"{name}: image and mask disagree on sample {i}"
        moved += _iou(warped_mask, masks[i, 0].numpy() > 0.5) < 0.98
    assert moved >= len(masks) // 2, f"{name} did not change the samples"


def test_albumentations_optical_distortion_keeps_image_and_mask_aligned() -> None:
    host = HostAugment(AugmentOptions(optical_distortion_p=1.0, optical_distortion_limit=0.5), seed=3)
    masks = _shapes(seed=2).numpy()[:, 0]
    moved = 0
    for mask in masks:
        image, out_mask = host(mask * 2.0 - 1.0, mask.astype(np.uint8))
        assert image.dtype == np.float32 and out_mask.dtype == np.uint8 and set(np.unique(out_mask)) <= {0, 1}
        assert _iou(image > 0.0, out_mask > 0) > 0.9
        moved += _iou(out_mask > 0, mask > 0.5) < 0.98
    assert moved >= 1


def test_intensity_transforms_change_images_not_masks() -> None:
    torch.manual_seed(2)
    masks = _shapes()
    images = torch.randn_like(masks)
    options = AugmentOptions(hflip_p=0.0, noise_p=1.0, noise_std=0.2, brightness_contrast_p=1.0)
    out_images, out_masks = DeviceAugment(options, SIZE)(images, masks)
    assert torch.equal(out_masks, masks)
    assert (out_images - images).abs().mean() > 0.05


def test_recipes_get_their_augmentations_from_the_libraries() -> None:
    host, device = build_augmentations(load_config("unet_b4_512").augment, 512)
    assert host is not None  # optical distortion: albumentations on the loader threads
    names = [type(t).__name__ for t in device.pipeline.children()]
    assert "RandomAffine" in names and "RandomHorizontalFlip" in names
    host, device = build_augmentations(load_config("backbones_resnet50").augment, 256)
    names = [type(t).__name__ for t in device.pipeline.children()]
    assert host is None and {"RandomAffine", "RandomResizedCrop", "RandomElasticTransform",
                             "RandomGaussianNoise", "RandomHorizontalFlip"} <= set(names)

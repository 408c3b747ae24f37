"""Augmentation, losses and samplers of the training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.augment import DeviceAugment
from trainer.batches import epoch_order, shard_batches
from trainer.config import AugmentOptions, LossOptions, SamplerOptions
from trainer.losses import ComboLoss


def test_hflip_moves_image_and_mask_together() -> None:
    torch.manual_seed(0)
    images = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    masks = (images % 3 == 0).float()
    out_images, out_masks = DeviceAugment(AugmentOptions(hflip_p=1.0, brightness_contrast_p=0.0))(images, masks)
    torch.testing.assert_close(out_images, images.flip(-1))
    torch.testing.assert_close(out_masks, masks.flip(-1))
    same = DeviceAugment(AugmentOptions(hflip_p=0.0))(images, masks)
    torch.testing.assert_close(same[0], images)


def test_brightness_contrast_changes_images_not_masks() -> None:
    torch.manual_seed(1)
    images = torch.randn(8, 1, 8, 8)
    masks = (torch.rand(8, 1, 8, 8) > 0.5).float()
    options = AugmentOptions(hflip_p=0.0, brightness_contrast_p=1.0, brightness=0.5, contrast=0.5)
    out_images, out_masks = DeviceAugment(options)(images, masks)
    assert not torch.allclose(out_images, images)
    torch.testing.assert_close(out_masks, masks)
    # Contrast acts around the mean: the per-image mean moves only by the brightness shift.
    shift = (out_images.mean((1, 2, 3)) - images.mean((1, 2, 3))).abs()
    assert (shift <= 0.5 * images.std((1, 2, 3)) + 1e-5).all()


def test_combo_loss_values() -> None:
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :2] = 1
    perfect = torch.where(target > 0, 20.0, -20.0)
    loss = ComboLoss(LossOptions(bce_weight=1, dice_weight=1, pos_weight=3.51))
    assert loss(perfect, target).item() == pytest.approx(0.0, abs=1e-3)
    wrong = -perfect
    assert loss(wrong, target).item() > 10
    weighted = ComboLoss(LossOptions(bce_weight=1, dice_weight=0, pos_weight=3.51))
    plain = ComboLoss(LossOptions(bce_weight=1, dice_weight=0, pos_weight=1.0))
    zeros = torch.zeros_like(target)  # p = 0.5 everywhere: positives cost 3.51x more
    expected = (4 * 3.51 + 12) / 16 * np.log(2)
    assert weighted(zeros, target).item() == pytest.approx(expected, rel=1e-5)
    assert plain(zeros, target).item() == pytest.approx(np.log(2), rel=1e-5)


def test_positive_fraction_sampler_moves_from_start_to_end() -> None:
    indices = np.arange(1000)
    positive = indices < 200  # 20% positive
    options = SamplerOptions(kind="positive_fraction", positive_fraction_start=0.8, positive_fraction_end=0.4)
    first = epoch_order(indices, positive, epoch=0, total_epochs=5, options=options, seed=0)
    last = epoch_order(indices, positive, epoch=4, total_epochs=5, options=options, seed=0)
    assert len(first) == 1000 and positive[first].mean() == pytest.approx(0.8)
    assert positive[last].mean() == pytest.approx(0.4)
    shuffle = epoch_order(indices, positive, epoch=0, total_epochs=5, options=SamplerOptions(), seed=0)
    assert sorted(shuffle) == list(indices)
    again = epoch_order(indices, positive, epoch=0, total_epochs=5, options=SamplerOptions(), seed=0)
    np.testing.assert_array_equal(shuffle, again)


def test_shard_batches_split_a_global_batch_across_ranks() -> None:
    order = np.arange(10)
    rank0 = shard_batches(order, batch_size=4, rank=0, world_size=2)
    rank1 = shard_batches(order, batch_size=4, rank=1, world_size=2)
    assert [b.tolist() for b in rank0] == [[0, 2], [4, 6]]
    assert [b.tolist() for b in rank1] == [[1, 3], [5, 7]]
    with pytest.raises(ValueError, match="not divisible"):
        shard_batches(order, batch_size=3, rank=0, world_size=2)


def test_cosine_schedule_runs_from_lr_to_min_lr() -> None:
    from trainer.training import _lr_lambda

    schedule = _lr_lambda(total_steps=100, warmup=0, floor=0.01)
    assert schedule(0) == pytest.approx(1.0)
    assert schedule(50) == pytest.approx(0.01 + 0.99 * 0.5)
    assert schedule(100) == pytest.approx(0.01)
    warm = _lr_lambda(total_steps=100, warmup=10, floor=0.0)
    assert warm(0) == pytest.approx(0.1) and warm(9) == pytest.approx(1.0)


def test_early_stopping_direction_per_monitor() -> None:
    from trainer.config import Monitor
    from trainer.training import _is_better

    assert _is_better(0.5, None, Monitor.DICE, 0.0)
    assert _is_better(0.6, 0.5, Monitor.IOU, 0.0) and not _is_better(0.55, 0.5, Monitor.DICE, 0.1)
    assert _is_better(0.3, 0.5, Monitor.LOSS, 0.0) and not _is_better(0.6, 0.5, Monitor.LOSS, 0.0)


def test_unused_encoder_head_is_frozen() -> None:
    from model.network import build_network
    from trainer.training import _freeze_unused_parameters

    network = build_network("unetplusplus", "efficientnet-b4")
    unused = _freeze_unused_parameters(network)
    assert unused and all(name.startswith("encoder._conv_head") or name.startswith("encoder._bn1") for name in unused)
    assert all(p.grad is None for p in network.parameters())
    assert not any(p.requires_grad for n, p in network.named_parameters() if n in unused)

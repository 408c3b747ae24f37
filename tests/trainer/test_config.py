"""Recipes: every shipped TOML validates, unknown keys and bad values are rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import ConfigError, available_configs, load_config


def test_every_shipped_recipe_loads() -> None:
    names = available_configs()
    for expected in ("unetpp_b4_256_clahe_crop", "unet_b4_512", "default_unetpp_b4_512", "tiny_test",
                     "backbones_resnet50", "backbones_efficientnet_b4", "backbones_xception"):
        assert expected in names
    for name in names:
        config = load_config(name)
        assert config.name == name


def test_seed_recipes_hold_the_published_settings() -> None:
    seed1 = load_config("unetpp_b4_256_clahe_crop")
    assert seed1.input_size == 256 and seed1.preprocess_config.lung_crop and seed1.preprocess_config.clahe
    assert seed1.augment.hflip_p == 0.3 and seed1.loss.pos_weight == 3.51
    assert seed1.split.kind == "kfold" and seed1.split.folds == 5 and seed1.early_stopping.patience == 15
    assert seed1.network.layer_dropout == (0.4, 0.3, 0.2, 0.2, 0.1)
    seed2 = load_config("unet_b4_512")
    assert seed2.network.architecture == "unet" and seed2.optim.batch_size == 32
    assert (seed2.optim.lr, seed2.optim.min_lr) == (1e-4, 1e-6)
    assert seed2.early_stopping.monitor == "iou" and seed2.early_stopping.patience == 20
    assert seed2.split.val_fraction == 0.15 and seed2.split.test_fraction == 0.0
    assert seed2.optim.epochs == 300 and seed2.tta == () and seed2.runtime.precision == "fp16"
    assert seed2.augment.affine_p > 0 and seed2.augment.optical_distortion_p > 0
    assert seed2.threshold_search.objective == "pixel_iou"
    assert 0.05 in seed2.threshold_search.thresholds and 0 in seed2.threshold_search.min_areas
    assert seed1.preprocess_config.scaling == "minmax" and seed1.early_stopping.validation_tta
    for name in ("resnet50", "efficientnet_b4", "xception"):
        backbone = load_config(f"backbones_{name}")
        assert backbone.input_size == 256 and backbone.preprocess_config.scaling == "unit"
        assert backbone.early_stopping.monitor == "dice" and backbone.split.test_fraction > 0
        augment = backbone.augment
        assert min(augment.affine_p, augment.hflip_p, augment.crop_p, augment.brightness_contrast_p,
                   augment.noise_p, augment.elastic_p) > 0
    default = load_config("default_unetpp_b4_512")
    assert default.sampler.kind == "positive_fraction" and default.threshold_search.mode == "triplet"
    assert {load_config(f"backbones_{n}").network.encoder for n in ("resnet50", "efficientnet_b4", "xception")} == {
        "resnet50", "efficientnet-b4", "xception"}


def test_unknown_key_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\n[optim]\nlearning_rate = 0.1\n')
    with pytest.raises(ConfigError, match="optim.learning_rate: Extra inputs are not permitted"):
        load_config(path)


def test_bad_values_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\n[network]\nencoder = "vgg11"\n[preprocess]\ninput_size = 100\n')
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "unknown encoder 'vgg11'" in str(error.value)
    assert "multiple of 32" in str(error.value)


def test_overrides_and_missing_recipe() -> None:
    config = load_config("tiny_test", {"optim.batch_size": 2, "augment.hflip_p": 0.0})
    assert config.optim.batch_size == 2 and config.augment.hflip_p == 0.0
    with pytest.raises(ConfigError, match="No recipe 'nope'"):
        load_config("nope")

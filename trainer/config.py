"""Typed training recipes: one TOML file per recipe, unknown keys rejected.

``load_config("unet_b4_512")`` reads ``trainer/configs/unet_b4_512.toml``; a path reads that
file. ``overrides`` (dotted keys, ``{"optim.batch_size": 4}``) are merged before validation.
"""

from __future__ import annotations

import copy
import enum
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.network import ARCHITECTURES, ENCODERS
from model.postprocess import PostprocessMode
from model.preprocess import PreprocessConfig

__all__ = [
    "CONFIG_DIR",
    "AugmentOptions",
    "ConfigError",
    "EarlyStoppingOptions",
    "EvaluationOptions",
    "LossOptions",
    "Monitor",
    "NetworkOptions",
    "OptimOptions",
    "RuntimeOptions",
    "SamplerOptions",
    "SearchObjective",
    "SplitOptions",
    "ThresholdSearchOptions",
    "TrainConfig",
    "available_configs",
    "load_config",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A recipe file is missing, not TOML, or holds an invalid value."""


class Monitor(enum.StrEnum):
    """Validation quantity that early stopping and best-checkpoint selection watch."""

    DICE = "dice"  # challenge Dice at network resolution, threshold 0.5
    IOU = "iou"
    LOSS = "loss"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkOptions(_Strict):
    architecture: str = "unetplusplus"
    encoder: str = "efficientnet-b4"
    # "imagenet" (downloaded by segmentation-models-pytorch), "none", or a local weights file.
    encoder_weights: str = "none"
    # Dropout2d rates on encoder features, bottleneck first (model.network convention).
    layer_dropout: tuple[float, ...] | None = None
    # Decoder widths, deepest first; None: segmentation-models-pytorch's default.
    decoder_channels: tuple[int, int, int, int, int] | None = None

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {value!r}; valid: {', '.join(sorted(ARCHITECTURES))}")
        return value

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, value: str) -> str:
        if value not in ENCODERS:
            raise ValueError(f"unknown encoder {value!r}; valid: {', '.join(sorted(ENCODERS))}")
        return value


class AugmentOptions(_Strict):
    """Per-sample training augmentations (trainer.augment): probability 0 turns one off.

    kornia on the training device: hflip, affine, resized crop, elastic, Gaussian noise;
    albumentations on the loader threads: optical distortion. Brightness and contrast act
    in units of each image's own standard deviation.
    """

    hflip_p: float = Field(0.5, ge=0.0, le=1.0)
    brightness_contrast_p: float = Field(0.0, ge=0.0, le=1.0)
    brightness: float = Field(0.2, ge=0.0, le=2.0)  # max shift, in units of the image's std
    contrast: float = Field(0.2, ge=0.0, lt=1.0)  # max relative change of contrast
    affine_p: float = Field(0.0, ge=0.0, le=1.0)
    affine_degrees: float = Field(0.0, ge=0.0, le=180.0)  # rotation in [-d, d]
    affine_translate: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of the side
    affine_scale: tuple[float, float] = (1.0, 1.0)
    crop_p: float = Field(0.0, ge=0.0, le=1.0)  # random resized crop, back to the input size
    crop_scale: tuple[float, float] = (0.7, 1.0)  # area fraction kept
    elastic_p: float = Field(0.0, ge=0.0, le=1.0)
    elastic_alpha: float = Field(1.0, gt=0.0)  # displacement scale (kornia, normalized coordinates)
    elastic_sigma: float = Field(16.0, gt=0.0)  # smoothness of the displacement field, pixels
    noise_p: float = Field(0.0, ge=0.0, le=1.0)
    noise_std: float = Field(0.05, ge=0.0)  # in network-input units
    optical_distortion_p: float = Field(0.0, ge=0.0, le=1.0)
    optical_distortion_limit: float = Field(0.05, ge=0.0, le=1.0)

    @field_validator("affine_scale", "crop_scale")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < value[0] <= value[1]:
            raise ValueError("a range must be (low, high) with 0 < low <= high")
        return value


class LossOptions(_Strict):
    bce_weight: float = Field(1.0, ge=0.0)
    dice_weight: float = Field(1.0, ge=0.0)
    focal_weight: float = Field(0.0, ge=0.0)
    pos_weight: float = Field(1.0, gt=0.0)  # BCE weight of positive pixels
    focal_gamma: float = Field(2.0, ge=0.0)

    @model_validator(mode="after")
    def _some_term(self) -> LossOptions:
        if self.bce_weight + self.dice_weight + self.focal_weight == 0:
            raise ValueError("at least one loss weight must be positive")
        return self


class OptimOptions(_Strict):
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1e-4, gt=0.0)
    min_lr: float = Field(1e-6, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_clip_norm: float | None = Field(None, gt=0.0)


class RuntimeOptions(_Strict):
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # autocast dtype on CUDA; CPU runs fp32
    channels_last: bool = True
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # "auto": keep the whole cache on the GPU when it fits in a quarter of free memory.
    data_on_device: Literal["auto", "always", "never"] = "auto"
    num_workers: int = Field(2, ge=0)  # cache-building processes and host-side loader threads
    eval_batch_size: int = Field(32, ge=1)


class EarlyStoppingOptions(_Strict):
    monitor: Monitor = Monitor.DICE
    patience: int = Field(15, ge=1)
    min_delta: float = Field(0.0, ge=0.0)
    # Per-epoch validation with the recipe's TTA (the UNet++ seed validates with hflip TTA).
    validation_tta: bool = False


class SplitOptions(_Strict):
    """``test_fraction`` > 0 sets a stratified test split aside first; nothing but the final
    evaluation ever sees it (early stopping, checkpoint, threshold and fold choice use
    validation only)."""

    kind: Literal["holdout", "kfold"] = "holdout"
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    # k-fold only: images no fold trains or validates on, where a fold ensemble's
    # postprocess is searched (serve.ensemble); 0: the ensemble reuses one fold's.
    tune_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    folds: int = Field(5, ge=2)
    seed: int = 42

    @model_validator(mode="after")
    def _room_for_training(self) -> SplitOptions:
        if self.kind == "holdout" and self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave images for training")
        if self.kind == "holdout" and self.tune_fraction:
            raise ValueError("tune_fraction is for k-fold runs (a fold ensemble's postprocess)")
        if self.test_fraction + self.tune_fraction >= 1.0:
            raise ValueError("test_fraction + tune_fraction must leave images for the folds")
        return self


class ServeOptions(_Strict):
    """What ``out/`` serves besides ``checkpoint`` (the best fold)."""

    # k-fold: also write out/ensemble, the mean of every trained fold's probabilities.
    ensemble: bool = False


class SamplerOptions(_Strict):
    """``positive_fraction``: each epoch draws this share of positives (SIIM-ACR winner),
    moving linearly from ``positive_fraction_start`` to ``positive_fraction_end``."""

    kind: Literal["shuffle", "positive_fraction"] = "shuffle"
    positive_fraction_start: float = Field(0.8, gt=0.0, lt=1.0)
    positive_fraction_end: float = Field(0.4, gt=0.0, lt=1.0)


class SearchObjective(enum.StrEnum):
    """What the post-processing grid search maximises on the validation images."""

    DICE = "dice"  # mean per-image Dice, 1 when both empty (the challenge metric)
    IOU = "iou"  # mean per-image IoU, 1 when both empty
    PIXEL_IOU = "pixel_iou"  # IoU pooled over every pixel of every image


class ThresholdSearchOptions(_Strict):
    """Grid searched on validation predictions; areas in pixels at 1024x1024 (model.postprocess)."""

    objective: SearchObjective = SearchObjective.DICE
    mode: PostprocessMode = PostprocessMode.THRESHOLD
    thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
    min_areas: tuple[int, ...] = (0, 250, 500, 1000, 2000, 3000)
    top_thresholds: tuple[float, ...] = (0.6, 0.7, 0.75, 0.8)
    top_min_areas: tuple[int, ...] = (0, 600, 1000, 1500, 2000)
    bottom_thresholds: tuple[float, ...] = (0.3, 0.4, 0.5)

    @field_validator("thresholds", "top_thresholds", "bottom_thresholds")
    @classmethod
    def _unit_interval(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if not values or not all(0.0 <= v <= 1.0 for v in values):
            raise ValueError("thresholds must be a non-empty list of numbers in [0, 1]")
        return values

    @field_validator("min_areas", "top_min_areas")
    @classmethod
    def _non_negative(cls, values: tuple[int, ...]) -> tuple[int, ...]:
        if not values or not all(v >= 0 for v in values):
            raise ValueError("areas must be a non-empty list of non-negative integers")
        return values


class EvaluationOptions(_Strict):
    """How ``ptx-train evaluate`` scores this recipe's checkpoints."""

    # Side of the square grid pixel-level metrics are counted on (the resolution the paper
    # scored); None: each image's own source resolution.
    score_size: int | None = Field(None, ge=32)


class TrainConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,80}$")
    description: str = ""
    seed: int = 0
    version: str = "0.1.0"
    # Name in the checkpoint manifest (and so in every output the node writes); default: name.
    model_name: str | None = Field(None, min_length=1, max_length=64)
    # A warning every output of the served model carries (model.checkpoint.Manifest.caveat).
    caveat: str = Field("", max_length=64)
    network: NetworkOptions = NetworkOptions()
    # model.preprocess.PreprocessConfig fields; checked by PreprocessConfig itself.
    preprocess: dict[str, Any] = Field(default_factory=dict)
    augment: AugmentOptions = AugmentOptions()
    loss: LossOptions = LossOptions()
    optim: OptimOptions = OptimOptions()
    runtime: RuntimeOptions = RuntimeOptions()
    early_stopping: EarlyStoppingOptions = EarlyStoppingOptions()
    split: SplitOptions = SplitOptions()
    sampler: SamplerOptions = SamplerOptions()
    threshold_search: ThresholdSearchOptions = ThresholdSearchOptions()
    evaluation: EvaluationOptions = EvaluationOptions()
    serve: ServeOptions = ServeOptions()
    tta: tuple[Literal["hflip"], ...] = ("hflip",)

    @model_validator(mode="after")
    def _ensemble_needs_folds(self) -> TrainConfig:
        if self.serve.ensemble and self.split.kind != "kfold":
            raise ValueError("serve.ensemble needs split.kind = 'kfold' (an ensemble of the folds)")
        return self

    @field_validator("preprocess")
    @classmethod
    def _valid_preprocess(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            return PreprocessConfig.from_dict(value).to_dict()
        except (TypeError, ValueError) as error:
            raise ValueError(str(error)) from error

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)

    @property
    def input_size(self) -> int:
        return self.preprocess_config.input_size


def available_configs() -> list[str]:
    """Names of the recipes shipped in ``trainer/configs``."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.toml"))


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"Override {dotted!r}: {key!r} is not a section.")
        node = child
    node[keys[-1]] = value


def _resolve(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.toml"
    if candidate.exists():
        return candidate
    raise ConfigError(
        f"No recipe {str(name_or_path)!r}: not a file and not one of {', '.join(available_configs())}."
    )


def load_config(
    name_or_path: str | Path, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """Read and validate a recipe; raises :class:`ConfigError` with every problem listed."""
    path = _resolve(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"Recipe file {str(path)!r} does not exist.") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"Recipe {str(path)!r} is not valid TOML: {error}") from error
    data = copy.deepcopy(data)
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in issue['loc']) or '(top)'}: {issue['msg']}"
            for issue in error.errors()
        )
        raise ConfigError(f"Recipe {str(path)!r} is invalid: {problems}") from None

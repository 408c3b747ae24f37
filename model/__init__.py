"""Pixels -> pneumothorax mask, shared by the node and the trainer.

``model.preprocess``, ``model.postprocess`` and ``model.checkpoint.Manifest`` do not import
torch; the torch-heavy names (network, Segmenter, checkpoint I/O) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "ARCHITECTURES",
    "ENCODERS",
    "CheckpointError",
    "GeometricTransform",
    "Manifest",
    "PostprocessConfig",
    "Prediction",
    "PreprocessConfig",
    "Segmenter",
    "SourceImage",
    "UnsupportedImageError",
    "build_network",
    "load_checkpoint",
    "postprocess",
    "preprocess",
    "save_checkpoint",
    "source_image_from_dataset",
    "source_image_from_png",
]

_LOCATIONS = {
    "ARCHITECTURES": "model.network",
    "ENCODERS": "model.network",
    "build_network": "model.network",
    "CheckpointError": "model.checkpoint",
    "Manifest": "model.checkpoint",
    "load_checkpoint": "model.checkpoint",
    "save_checkpoint": "model.checkpoint",
    "PostprocessConfig": "model.postprocess",
    "Prediction": "model.postprocess",
    "postprocess": "model.postprocess",
    "GeometricTransform": "model.preprocess",
    "PreprocessConfig": "model.preprocess",
    "SourceImage": "model.preprocess",
    "UnsupportedImageError": "model.preprocess",
    "preprocess": "model.preprocess",
    "source_image_from_dataset": "model.preprocess",
    "source_image_from_png": "model.preprocess",
    "Segmenter": "model.infer",
}

if TYPE_CHECKING:
    from model.checkpoint import CheckpointError, Manifest, load_checkpoint, save_checkpoint
    from model.infer import Segmenter
    from model.network import ARCHITECTURES, ENCODERS, build_network
    from model.postprocess import PostprocessConfig, Prediction, postprocess
    from model.preprocess import (
        GeometricTransform,
        PreprocessConfig,
        SourceImage,
        UnsupportedImageError,
        preprocess,
        source_image_from_dataset,
        source_image_from_png,
    )


def __getattr__(name: str) -> Any:
    module_name = _LOCATIONS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

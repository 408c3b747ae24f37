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
    "load_ensemble",
    "postprocess",
    "preprocess",
    "save_checkpoint",
    "save_ensemble",
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
    "load_ensemble": "model.checkpoint",
    "save_ensemble": "model.checkpoint",
    "Segmenter": "model.infer",
}

# Bound eagerly (torch-free): the functions `preprocess`/`postprocess` share their names with
# their submodules, and importing a submodule would otherwise leave the module bound here.
from model.postprocess import PostprocessConfig, Prediction, postprocess  # noqa: E402
from model.preprocess import (  # noqa: E402
    GeometricTransform,
    PreprocessConfig,
    SourceImage,
    UnsupportedImageError,
    preprocess,
    source_image_from_dataset,
    source_image_from_png,
)

if TYPE_CHECKING:
    from model.checkpoint import (
        CheckpointError,
        Manifest,
        load_checkpoint,
        load_ensemble,
        save_checkpoint,
        save_ensemble,
    )
    from model.infer import Segmenter
    from model.network import ARCHITECTURES, ENCODERS, build_network


def __getattr__(name: str) -> Any:
    module_name = _LOCATIONS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

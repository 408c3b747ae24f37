"""Checkpoints whose answer does not depend on an untrained network's luck: the last
convolution's weights are zero and its bias is large, so every pixel's probability is
sigmoid(+-bias) whatever the image (positive: the whole lung-crop region is the mask)."""

from __future__ import annotations

from pathlib import Path

from model.checkpoint import Manifest, save_checkpoint
from model.postprocess import PostprocessConfig
from model.preprocess import PreprocessConfig

# sigmoid(12) = 0.999994, sigmoid(-12) = 6e-6: far from any threshold
_BIAS = 12.0
_INPUT_SIZE = 256  # the node's path is under test, not the network: small and fast on CPU


def forced_checkpoint(directory: Path, *, positive: bool, encoder: str = "efficientnet-b0") -> Path:
    """Write a checkpoint (model format, sha256-pinned) that finds everything or nothing."""
    import torch

    from model.network import build_network

    network = build_network("unetplusplus", encoder)
    head = network.segmentation_head[0]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(_BIAS if positive else -_BIAS)
    manifest = Manifest(
        name=f"forced-{'positive' if positive else 'negative'}",
        version="1.0.0",
        encoder=encoder,
        input_size=_INPUT_SIZE,
        preprocess=PreprocessConfig(input_size=_INPUT_SIZE).to_dict(),
        postprocess=PostprocessConfig().to_dict(),
        intended_use="Tests only: answers every image the same way, whatever it shows.",
    )
    return save_checkpoint(directory, network, manifest)

"""Encoder initialisation: a local weights file (offline boxes) and a clear error when a download fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import save_file

from model.network import build_network
from trainer.config import NetworkOptions
from trainer.training import load_encoder_weights


def test_local_rgb_encoder_file_is_loaded_into_the_gray_network(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rgb = smp.encoders.get_encoder("resnet18", in_channels=3, weights=None)  # what 'imagenet' would download
    path = tmp_path / "resnet18.imagenet.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(path))
    network = build_network("unet", "resnet18")
    assert load_encoder_weights(network, NetworkOptions(architecture="unet", encoder="resnet18",
                                                        encoder_weights=str(path))) == f"file:{path.name}"
    torch.testing.assert_close(network.encoder.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(network.encoder.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)


def test_wrong_or_missing_file_is_explained(tmp_path: Path) -> None:
    network = build_network("unet", "resnet18")
    with pytest.raises(ValueError, match="no such file"):
        load_encoder_weights(network, NetworkOptions(architecture="unet", encoder="resnet18",
                                                     encoder_weights=str(tmp_path / "missing.safetensors")))
    other = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match="does not hold resnet18 encoder weights"):
        load_encoder_weights(network, NetworkOptions(architecture="unet", encoder="resnet18",
                                                     encoder_weights=str(other)))


def test_failed_imagenet_download_names_the_file_and_the_setting(tmp_path: Path, monkeypatch) -> None:
    # offline mode: the hub answers from its (empty) cache only, as on a box without internet
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    network = build_network("unet", "resnet18")
    with pytest.raises(ValueError) as error:
        load_encoder_weights(network, NetworkOptions(architecture="unet", encoder="resnet18", encoder_weights="imagenet"))
    message = str(error.value)
    assert "smp-hub/resnet18.imagenet" in message and "model.safetensors" in message
    assert "https://huggingface.co/smp-hub/resnet18.imagenet/resolve/" in message
    assert "network.encoder_weights" in message

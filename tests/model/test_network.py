"""Network registry and the layer-wise dropout option (small inputs: CPU CI)."""

from __future__ import annotations

import pytest
import torch

from model.network import ARCHITECTURES, DEFAULT_LAYER_DROPOUT, ENCODERS, build_network


def test_registries_list_the_seed_backbones() -> None:
    assert {"unetplusplus", "unet"} <= set(ARCHITECTURES)
    assert {"efficientnet-b4", "resnet50", "xception"} <= set(ENCODERS)


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(KeyError, match="Unknown architecture 'fpn'; valid architectures: unet, unetplusplus"):
        build_network("fpn")
    with pytest.raises(KeyError, match="valid encoders: .*efficientnet-b4.*resnet50.*xception"):
        build_network("unet", "vgg16")


def test_unetplusplus_b4_forward_shape() -> None:
    torch.manual_seed(0)
    network = build_network().eval()  # the served network: UNet++ / EfficientNet-B4
    assert sum(p.numel() for p in network.parameters()) == pytest.approx(20.8e6, rel=0.01)
    with torch.inference_mode():
        out = network(torch.randn(1, 1, 64, 64))
    assert out.shape == (1, 1, 64, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("encoder", ["resnet50", "xception"])
def test_other_backbones_build(encoder: str) -> None:
    network = build_network("unet", encoder)
    assert network.encoder.out_channels[0] == 1  # single-channel radiographs


def test_layer_dropout_is_active_in_training_only() -> None:
    torch.manual_seed(0)
    network = build_network("unet", "efficientnet-b0", layer_dropout=DEFAULT_LAYER_DROPOUT)
    plain = build_network("unet", "efficientnet-b0")
    assert set(network.state_dict()) == set(plain.state_dict())  # checkpoints interchangeable
    x = torch.randn(2, 1, 64, 64)
    network.eval()
    with torch.no_grad():
        a, b = network(x), network(x)
    torch.testing.assert_close(a, b)
    network.train()
    with torch.no_grad():
        c, d = network(x), network(x)
    assert not torch.allclose(c, d)
    rates = [m.p for m in network.feature_dropout.dropouts]
    assert rates == [0.1, 0.2, 0.2, 0.3, 0.4]  # shallow -> bottleneck
    with pytest.raises(ValueError, match="layer_dropout must hold 1 to 5 rates"):
        build_network("unet", "efficientnet-b0", layer_dropout=(1.5,))

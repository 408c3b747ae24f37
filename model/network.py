"""Network registry: architectures and encoders the seeds compare, always without downloads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_LAYER_DROPOUT",
    "ENCODERS",
    "build_network",
]

#: Architecture name -> smp model class.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "unetplusplus": smp.UnetPlusPlus,
    "unet": smp.Unet,
}

#: Encoder name (as manifests spell it) -> smp encoder name. smp's "xception" is the
#: Keras/Chollet Xception the backbone comparison uses.
ENCODERS: dict[str, str] = {
    "efficientnet-b0": "efficientnet-b0",  # small sibling: tests and quick experiments
    "efficientnet-b4": "efficientnet-b4",
    "timm-efficientnet-b4": "timm-efficientnet-b4",
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "mobilenet_v2": "mobilenet_v2",  # small and fast on CPU: the demo model
    "xception": "xception",
}

#: UNet++ paper's layer-specific dropout, deepest (bottleneck) feature first, shallowest last.
DEFAULT_LAYER_DROPOUT: tuple[float, ...] = (0.4, 0.3, 0.2, 0.2, 0.1)


def _lookup(registry: dict[str, Any], name: str, what: str) -> Any:
    try:
        return registry[name]
    except KeyError:
        raise KeyError(f"Unknown {what} {name!r}; valid {what}s: {', '.join(sorted(registry))}.") from None


class _EncoderFeatureDropout(nn.Module):
    """Dropout2d per encoder feature (skip connection) depth; identity in eval mode."""

    def __init__(self, rates: Sequence[float]) -> None:
        super().__init__()
        self.rates = tuple(float(r) for r in rates)
        # features[0] is the input itself; features[-1] is the bottleneck.
        self.dropouts = nn.ModuleList(nn.Dropout2d(r) for r in reversed(self.rates))

    def apply(self, features: list[torch.Tensor]) -> list[torch.Tensor]:  # type: ignore[override]
        skips = features[1:]
        offset = len(skips) - len(self.dropouts)
        out = list(features[:1])
        for i, feature in enumerate(skips):
            j = i - offset
            out.append(self.dropouts[j](feature) if j >= 0 else feature)
        return out


def build_network(
    architecture: str = "unetplusplus",
    encoder: str = "efficientnet-b4",
    *,
    in_channels: int = 1,
    classes: int = 1,
    layer_dropout: tuple[float, ...] | None = None,
    decoder_channels: Sequence[int] | None = None,
) -> nn.Module:
    """Build a segmentation network with random weights (``encoder_weights=None``, no download).

    ``layer_dropout`` gives Dropout2d rates for the encoder features feeding the decoder,
    bottleneck first (the UNet++ paper's 0.4 / 0.3 / 0.2 / 0.2 / 0.1 is
    :data:`DEFAULT_LAYER_DROPOUT`); dropout has no weights, so checkpoints are the same
    with and without it. ``decoder_channels`` (five widths, deepest first) narrows the
    decoder; None keeps segmentation-models-pytorch's default. The network returns logits
    (N, classes, H, W).
    """
    model_class = _lookup(ARCHITECTURES, architecture, "architecture")
    encoder_name = _lookup(ENCODERS, encoder, "encoder")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError("in_channels must be a positive integer.")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError("classes must be a positive integer.")
    extra: dict[str, Any] = {}
    if decoder_channels is not None:
        widths = tuple(decoder_channels)
        if len(widths) != 5 or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
            raise ValueError("decoder_channels must hold 5 positive integers, deepest first.")
        extra["decoder_channels"] = widths
    network = model_class(
        encoder_name=encoder_name, encoder_weights=None, in_channels=in_channels, classes=classes, **extra
    )
    if layer_dropout is not None:
        rates = tuple(float(r) for r in layer_dropout)
        if not rates or len(rates) > 5 or not all(0.0 <= r < 1.0 for r in rates):
            raise ValueError("layer_dropout must hold 1 to 5 rates in [0, 1), bottleneck first.")
        feature_dropout = _EncoderFeatureDropout(rates)
        network.feature_dropout = feature_dropout

        def _drop_features(_module: nn.Module, _inputs: Any, features: list[torch.Tensor]) -> list[torch.Tensor]:
            return feature_dropout.apply(features)

        network.encoder.register_forward_hook(_drop_features)
    return network

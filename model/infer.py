"""Segmenter: checkpoint + preprocessing + network + TTA + post-processing, CPU and GPU paths."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.checkpoint import (
    CheckpointError,
    Manifest,
    ensemble_suffix,
    load_weights,
)
from model.network import build_network
from model.postprocess import PostprocessConfig, Prediction, postprocess
from model.preprocess import (
    GeometricTransform,
    PreprocessConfig,
    SourceImage,
    preprocess,
    source_image_from_dataset,
)
from model.runtime import Runner, RuntimeName, make_runner

__all__ = ["TTA_TRANSFORMS", "Segmenter", "TTATransform"]


@dataclass(frozen=True)
class TTATransform:
    """A test-time augmentation: ``forward`` on the input batch, ``inverse`` on the output."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]


def _hflip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=(-1,))


#: Registry of TTA transforms by manifest name (room for more: vflip, scale, ...).
TTA_TRANSFORMS: dict[str, TTATransform] = {"hflip": TTATransform(forward=_hflip, inverse=_hflip)}


def _resolve_device(device: str | torch.device) -> torch.device:
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {str(device)!r} requested but CUDA is not available.")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"Device must be 'cpu' or 'cuda[:N]', got {str(device)!r}.")
    return resolved


class Segmenter:
    """Turns radiographs into :class:`~model.postprocess.Prediction` objects.

    Build with :meth:`from_checkpoint` (served models) or :meth:`untrained` (random weights,
    for demos and tests). A fold ensemble (``network`` a sequence of the members' networks,
    in the manifest's member order) serves the mean of its members' probabilities: each
    member averages its own TTA views, then the members are averaged (equal weights, so this
    is also the mean over every member x view); the manifest's postprocess then applies once.
    The TTA views of a batch run as one batch. CPU path (runtime
    "auto"): ONNX Runtime on a locally exported graph when installed, else
    PyTorch with inference mode and channels-last. GPU path: PyTorch bf16 autocast,
    channels-last, optional ``torch.compile`` on fixed (padded) batch shapes.

    The Segmenter owns ``network``: it is put in eval mode and may be moved to the device or
    to channels-last. The ONNX export is cached per weights (``PTX_MODEL_CACHE_DIR``, default
    ``~/.cache/ptx-node/onnx``); evaluating a network that changes every epoch is cheaper with
    ``runtime="torch"``. Call :meth:`warmup` at worker start so the first job does not pay the
    export (seconds to tens of seconds on two cores).
    """

    def __init__(
        self,
        network: nn.Module | Sequence[nn.Module],
        manifest: Manifest,
        *,
        device: str | torch.device = "cpu",
        tta: bool = True,
        checkpoint_sha256: str | None = None,
        untrained: bool = False,
        runtime: RuntimeName | str = RuntimeName.AUTO,
        compile: bool = False,
        max_batch_size: int | None = None,
        num_threads: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        networks = (network,) if isinstance(network, nn.Module) else tuple(network)
        if not networks or not all(isinstance(n, nn.Module) for n in networks):
            raise TypeError("Segmenter needs a torch.nn.Module network (or a sequence of them for an ensemble).")
        if not isinstance(manifest, Manifest):
            raise TypeError("Segmenter needs a Manifest.")
        n_members = len(manifest.member_folds) or 1
        if len(networks) != n_members:
            raise ValueError(f"The manifest describes {n_members} network(s) but {len(networks)} were given.")
        if not isinstance(tta, bool):
            raise TypeError("Segmenter tta must be a boolean.")
        self.manifest = manifest
        self.device = _resolve_device(device)
        try:
            self.runtime = RuntimeName(runtime)
        except ValueError:
            valid = ", ".join(r.value for r in RuntimeName)
            raise ValueError(f"runtime must be one of {valid}; got {runtime!r}.") from None
        if self.runtime is RuntimeName.ONNXRUNTIME and self.device.type != "cpu":
            raise ValueError("runtime 'onnxruntime' is the CPU path; use 'torch' (or 'auto') on CUDA.")
        self.checkpoint_sha256 = checkpoint_sha256
        self.untrained = bool(untrained)
        self.preprocess_config: PreprocessConfig = manifest.preprocess_config
        self.postprocess_config: PostprocessConfig = manifest.postprocess_config
        #: TTA transforms applied when a call says tta=True: the manifest's, none when it lists none.
        self.tta_transforms: tuple[str, ...] = tuple(manifest.tta)
        self.tta = tta
        if max_batch_size is None:
            max_batch_size = 32 if self.device.type == "cuda" else 1
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError("max_batch_size must be a positive integer.")
        self.max_batch_size = max_batch_size
        self.num_threads = num_threads
        self.compile = bool(compile)
        self._cache_dir = None if cache_dir is None else Path(cache_dir)
        #: Every member's network (one for a single checkpoint); ``network`` is the first.
        self.networks: tuple[nn.Module, ...] = tuple(n.eval() for n in networks)
        self.network = self.networks[0]
        self._runners: tuple[Runner, ...] | None = None
        self._runner_lock = threading.Lock()

    @property
    def is_ensemble(self) -> bool:
        return self.manifest.ensemble is not None

    @property
    def runners(self) -> tuple[Runner, ...]:
        """One execution backend per member, built on first use (an ONNX export can take seconds)."""
        with self._runner_lock:
            if self._runners is None:
                self._runners = tuple(self._make_runner(network) for network in self.networks)
        return self._runners

    @property
    def runner(self) -> Runner:
        """The (first member's) execution backend."""
        return self.runners[0]

    def _make_runner(self, network: nn.Module) -> Runner:
        return make_runner(
            self.runtime,
            network,
            self.device,
            input_shape=(self.manifest.in_channels, self.input_size, self.input_size),
            num_threads=self.num_threads,
            compile=self.compile,
            fixed_batch=self.max_batch_size * (1 + len(self.tta_transforms)),
            cache_dir=self._cache_dir,
        )

    @property
    def runtime_name(self) -> str:
        """The backend in use ("onnxruntime", "torch", "torch-compile"; "... x3 folds" for an ensemble)."""
        name = self.runner.name
        return f"{name} x{len(self.networks)} folds" if self.is_ensemble else name

    def warmup(self) -> None:
        """Build the backend and run one forward (export, compilation) before the first job."""
        size = self.input_size
        batch = np.zeros((1, size, size), dtype=np.float32)
        self.predict_probability_net(batch, tta=self.tta)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        tta: bool = True,
        **options: Any,
    ) -> Segmenter:
        """Load a checkpoint directory, one network or a fold ensemble (verifies every weights
        file's sha256; no network access)."""
        states, manifest = load_weights(path)
        networks = []
        for fold, state in states.items():
            network = build_network(
                manifest.architecture, manifest.encoder,
                in_channels=manifest.in_channels, classes=manifest.classes,
                decoder_channels=manifest.decoder_channels,
            )
            try:
                network.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                if fold is None:
                    raise
                detail = " ".join(str(exc).split())[:200]
                raise CheckpointError(
                    f"Ensemble member fold {fold} does not fit the manifest's network "
                    f"({manifest.architecture} / {manifest.encoder}): {detail}"
                ) from None
            networks.append(network)
        return cls(
            networks, manifest, device=device, tta=tta,
            checkpoint_sha256=manifest.weights_sha256, untrained=False, **options,
        )

    @classmethod
    def untrained(
        cls,
        device: str | torch.device = "cpu",
        input_size: int = 512,
        tta: bool = True,
        seed: int = 0,
        *,
        architecture: str = "unetplusplus",
        encoder: str = "efficientnet-b4",
        **options: Any,
    ) -> Segmenter:
        """UNet++/EfficientNet-B4 with seeded random weights: outputs are meaningless."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = build_network(architecture, encoder)
        manifest = Manifest(
            name="untrained",
            version="0",
            architecture=architecture,
            encoder=encoder,
            input_size=input_size,
            preprocess=PreprocessConfig(input_size=input_size).to_dict(),
            intended_use="Untrained random weights for demos and tests; outputs are meaningless.",
        )
        return cls(network, manifest, device=device, tta=tta, untrained=True, **options)

    # ------------------------------------------------------------------ identity

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        """The manifest's version; an ensemble's says how many folds it averages ("1.0 3-fold ensemble")."""
        if self.is_ensemble:
            return self.manifest.version + ensemble_suffix(len(self.networks))
        return self.manifest.version

    @property
    def input_size(self) -> int:
        return self.preprocess_config.input_size

    @property
    def caveat(self) -> str | None:
        """The warning the manifest asks every output to carry (e.g. a demo model), or None."""
        return self.manifest.caveat or None

    # ------------------------------------------------------------------ inference

    def _transforms_for(self, tta: bool | None) -> tuple[TTATransform, ...]:
        use = self.tta if tta is None else tta
        if not isinstance(use, bool):
            raise TypeError("tta must be True, False or None.")
        return tuple(TTA_TRANSFORMS[name] for name in self.tta_transforms) if use else ()

    def _probabilities(self, x: torch.Tensor, transforms: Sequence[TTATransform]) -> torch.Tensor:
        """(n, 1, S, S) normalized input -> (n, S, S) probability, TTA views in one batch."""
        n = x.shape[0]
        x = x.to(self.device, non_blocking=True)  # TTA views are built on the device
        views = torch.cat([x, *(t.forward(x) for t in transforms)], dim=0)
        members = []
        for runner in self.runners:  # an ensemble: each member's TTA mean, then their mean
            prob = torch.sigmoid(runner(views)[:, 0])  # stays on the device until the end
            total = prob[:n].clone()
            for i, t in enumerate(transforms, start=1):
                total += t.inverse(prob[i * n:(i + 1) * n])
            members.append(total / (1 + len(transforms)))
        return members[0] if len(members) == 1 else torch.stack(members).mean(dim=0)

    def predict_probability_net(self, net_input: np.ndarray, *, tta: bool | None = None) -> np.ndarray:
        """Network-grid probabilities for a preprocessed batch: (N, S, S) -> (N, S, S) float32."""
        if not isinstance(net_input, np.ndarray) or net_input.ndim != 3:
            raise ValueError("predict_probability_net() needs a numpy array of shape (N, S, S).")
        n, h, w = net_input.shape
        if h != w or h % 32 != 0:
            raise ValueError(f"Network input must be square with a side divisible by 32, got {h}x{w}.")
        transforms = self._transforms_for(tta)
        out = np.empty((n, h, w), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, n, self.max_batch_size):
                chunk = np.ascontiguousarray(net_input[start:start + self.max_batch_size], dtype=np.float32)
                x = torch.from_numpy(chunk)[:, None]
                out[start:start + len(chunk)] = self._probabilities(x, transforms).cpu().numpy()
        return out

    def _prepare(self, source: SourceImage | Any) -> tuple[SourceImage, np.ndarray, GeometricTransform]:
        if not isinstance(source, SourceImage):
            source = source_image_from_dataset(source)
        net_input, transform = preprocess(source, self.preprocess_config)
        return source, net_input, transform

    def _finish(self, source: SourceImage, probability_net: np.ndarray, transform: GeometricTransform) -> Prediction:
        probability_src = np.clip(transform.inverse(probability_net, order="linear"), 0.0, 1.0)
        if source.padding is not None:
            probability_src[source.padding] = 0.0  # padding is never a finding
        return postprocess(probability_src, self.postprocess_config, source.pixel_spacing_mm)

    def predict(self, source: SourceImage | Any, *, tta: bool | None = None) -> Prediction:
        """Segment one radiograph (a SourceImage or a pydicom Dataset) at source resolution."""
        image, net_input, transform = self._prepare(source)
        probability_net = self.predict_probability_net(net_input[None], tta=tta)[0]
        return self._finish(image, probability_net, transform)

    def predict_batch(self, sources: Sequence[SourceImage | Any], *, tta: bool | None = None) -> list[Prediction]:
        """Segment several radiographs, running the network in batches of ``max_batch_size``."""
        prepared = [self._prepare(source) for source in sources]
        if not prepared:
            return []
        batch = np.stack([net_input for _, net_input, _ in prepared])
        probabilities = self.predict_probability_net(batch, tta=tta)
        return [
            self._finish(image, probability, transform)
            for (image, _, transform), probability in zip(prepared, probabilities, strict=True)
        ]

    def __repr__(self) -> str:
        return (
            f"Segmenter(name={self.name!r}, version={self.version!r}, members={len(self.networks)}, "
            f"device={str(self.device)!r}, "
            f"untrained={self.untrained}, tta={self.tta})"
        )

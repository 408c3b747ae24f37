"""The training loop: one code path for CPU, one GPU and ``torchrun`` (DDP).

Speed on CUDA comes from: the cache on the GPU (one gather per step, no loader), device-side
augmentation, bf16 autocast, channels-last, fused Adam, optional ``torch.compile``, and no
host synchronisation inside the step except every ``log_every`` steps for the progress bar.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.checkpoint import Manifest, load_checkpoint, save_checkpoint
from model.network import build_network
from trainer.augment import build_augmentations
from trainer.batches import BatchObserver, BatchSource, epoch_order, shard_batches
from trainer.config import Monitor, NetworkOptions, TrainConfig
from trainer.data import (
    CachedSet,
    DataSource,
    Split,
    build_cache,
    discover,
    holdout_split,
    kfold_split,
    read_split,
    write_split,
)
from trainer.distributed import DistContext
from trainer.losses import ComboLoss
from trainer.thresholds import SearchResult, search_postprocess

__all__ = [
    "FoldResult",
    "TrainResult",
    "load_encoder_weights",
    "measure_throughput",
    "predict_probabilities",
    "train",
]

LAST_STATE = "last.pt"
BEST_DIR = "best"
HISTORY_FILE = "history.json"
FINAL_CHECKPOINT = "checkpoint"
ENSEMBLE_CHECKPOINT = "ensemble"


@dataclass
class FoldResult:
    fold: int
    best_epoch: int
    best_value: float
    monitor: str
    steps: int
    checkpoint: Path
    search: SearchResult | None
    history: list[dict[str, Any]] = field(default_factory=list)
    validation: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path  # the served checkpoint (best fold)
    folds: list[FoldResult]
    summary: dict[str, Any]
    ensemble: Path | None = None  # the fold ensemble, when the recipe asks for one (serve.ensemble)


# --------------------------------------------------------------------------- helpers


def _imagenet_download_error(options: NetworkOptions, settings: dict[str, Any] | None, error: Exception) -> str:
    if settings is None:
        return f"segmentation-models-pytorch has no ImageNet weights for encoder {options.encoder!r}."
    repo, revision = settings["repo_id"], settings["revision"]
    url = f"https://huggingface.co/{repo}/resolve/{revision}/model.safetensors"
    return (
        f"encoder_weights = 'imagenet' downloads {repo} (model.safetensors) from the Hugging Face Hub through "
        f"segmentation-models-pytorch, and that failed ({type(error).__name__}: {str(error)[:200]}). "
        f"On an offline machine, fetch {url} where there is internet, copy it to this machine "
        f"(e.g. ~/.cache/ptx-train/weights/{options.encoder}.imagenet.safetensors) and set "
        f"network.encoder_weights to that path (--set network.encoder_weights=PATH)."
    )


def _fit_input_channels(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RGB first-layer weights -> our gray input: summed over colour, as smp does for in_channels=1."""
    fitted = {}
    for key, value in state.items():
        want = target.get(key)
        if want is not None and value.ndim == 4 and want.ndim == 4 and value.shape[1] == 3 and want.shape[1] == 1 \
                and value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:]:
            value = value.sum(dim=1, keepdim=True)
        fitted[key] = value
    return fitted


def load_encoder_weights(network: nn.Module, options: NetworkOptions) -> str:
    """Initialise the encoder: ``none`` (random), ``imagenet`` (smp download) or a local file.

    A file may hold encoder weights (e.g. the ``model.safetensors`` that ``imagenet`` would
    download: RGB first-layer weights are summed to our one gray channel) or whole-network
    weights (``encoder.`` prefixed keys); safetensors or a torch state dict. A failed
    download says which file to fetch and where to point ``encoder_weights``.
    """
    weights = options.encoder_weights
    if weights.lower() == "none":
        return "none"
    encoder = network.encoder  # type: ignore[attr-defined]
    if weights.lower() == "imagenet":
        import segmentation_models_pytorch as smp

        from model.network import ENCODERS

        name = ENCODERS[options.encoder]
        settings = smp.encoders.encoders.get(name, {}).get("pretrained_settings", {}).get("imagenet")
        try:
            if settings is None:
                raise KeyError("imagenet")
            pretrained = smp.encoders.get_encoder(name, in_channels=1, depth=encoder._depth, weights="imagenet")
        except Exception as error:  # noqa: BLE001 - hub, HTTP and socket errors all mean "not downloadable here"
            raise ValueError(_imagenet_download_error(options, settings, error)) from None
        encoder.load_state_dict(pretrained.state_dict())
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(
            f"encoder_weights must be 'none', 'imagenet' or a weights file; {weights!r} is none of these "
            f"(no such file)."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if any(key.startswith("encoder.") for key in state):
        state = _fit_input_channels(state, network.state_dict())
        missing, unexpected = network.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"{weights}: {len(unexpected)} unexpected keys, e.g. {unexpected[0]!r}.")
    else:
        state = _fit_input_channels(state, encoder.state_dict())
        try:
            encoder.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"{weights} does not hold {options.encoder} encoder weights: {str(error)[:300]}") from None
    return f"file:{path.name}"


def _freeze_unused_parameters(network: nn.Module) -> list[str]:
    """Stop training parameters the forward pass never uses (e.g. an encoder's classifier head).

    DDP requires every trainable parameter to get a gradient each step; finding them once
    here is cheaper than ``find_unused_parameters=True`` on every step. Eval mode: the probe
    must not move BatchNorm statistics.
    """
    was_training = network.training
    network.eval()
    probe = torch.zeros(1, 1, 64, 64)
    network(probe).float().sum().backward()
    unused = [name for name, p in network.named_parameters() if p.requires_grad and p.grad is None]
    for name, parameter in network.named_parameters():
        parameter.grad = None
        if name in unused:
            parameter.requires_grad_(False)
    network.train(was_training)
    return unused


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()  # CPU runs fp32: bf16 autocast there is slower


def _lr_lambda(total_steps: int, warmup: int, floor: float):
    def schedule(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


def _per_image_scores(probability: torch.Tensor, truth: torch.Tensor, threshold: float = 0.5):
    predicted = probability > threshold
    actual = truth > 0.5
    dims = tuple(range(1, predicted.ndim))
    intersection = (predicted & actual).sum(dims).float()
    predicted_sum = predicted.sum(dims).float()
    truth_sum = actual.sum(dims).float()
    union = predicted_sum + truth_sum - intersection
    dice = torch.where(predicted_sum + truth_sum == 0, 1.0, 2 * intersection / (predicted_sum + truth_sum).clamp(min=1))
    iou = torch.where(union == 0, 1.0, intersection / union.clamp(min=1))
    return dice, iou


def _forward_probability(
    network: nn.Module, images: torch.Tensor, tta: bool, device: torch.device, precision: str, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of the plain view, probability averaged over TTA views) for one batch."""
    views = torch.cat([images, images.flip(-1)]) if tta else images
    if channels_last:
        views = views.contiguous(memory_format=torch.channels_last)
    with _autocast(device, precision):
        logits = network(views).float()
    n = images.shape[0]
    probability = torch.sigmoid(logits[:n])
    if tta:  # as model.infer.Segmenter: mean of probabilities, flipped view flipped back
        probability = (probability + torch.sigmoid(logits[n:]).flip(-1)) / 2
    return logits[:n], probability


def predict_probabilities(
    network: nn.Module,
    source: BatchSource,
    indices: np.ndarray,
    *,
    batch_size: int,
    tta: bool,
    precision: str = "bf16",
    channels_last: bool = True,
    purpose: str = "validation",
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (logits, probability, mask) per batch of ``indices`` (eval mode, no grad)."""
    was_training = network.training
    network.eval()
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    try:
        with torch.inference_mode():
            for images, masks in source.batches(batches, purpose=purpose):
                logits, probability = _forward_probability(
                    network, images, tta, source.device, precision, channels_last
                )
                yield logits, probability, masks
    finally:
        network.train(was_training)


def _is_better(value: float, best: float | None, monitor: Monitor, min_delta: float) -> bool:
    if best is None:
        return True
    if monitor is Monitor.LOSS:
        return value < best - min_delta
    return value > best + min_delta


def _prepare_split(config: TrainConfig, cache: CachedSet, out_dir: Path, split_file: Path | None) -> Split:
    target = out_dir / "split.json"
    if split_file is not None:
        split = read_split(split_file)
    elif target.is_file():  # resume: the split the run started with
        split = read_split(target)
    elif config.split.kind == "kfold":
        split = kfold_split(cache.image_ids, cache.positive, n_folds=config.split.folds, seed=config.split.seed,
                            test_fraction=config.split.test_fraction, tune_fraction=config.split.tune_fraction)
    else:
        split = holdout_split(
            cache.image_ids, cache.positive, val_fraction=config.split.val_fraction, seed=config.split.seed,
            test_fraction=config.split.test_fraction,
        )
    write_split(target, split)
    return split


def _training_data(source: DataSource, cache: CachedSet, split: Split, fold: int, n_train: int, n_val: int) -> dict[str, Any]:
    description = source.describe()
    description.update(
        {
            "n_positive": int(cache.positive.sum()),
            "n_train": n_train,
            "n_val": n_val,
            "n_test": len(split.test_ids()),
            "split": {"kind": split.kind.value, "seed": split.seed, "fold": fold, "n_folds": split.n_folds,
                      "test_fraction": split.test_fraction, "sha256": split.sha256()},
        }
    )
    return description


# --------------------------------------------------------------------------- one fold


class _FoldRun:
    def __init__(
        self,
        config: TrainConfig,
        cache: CachedSet,
        source: DataSource | None,
        split: Split,
        fold: int,
        fold_dir: Path | None,
        dist: DistContext,
        *,
        max_steps: int | None,
        resume: bool,
        progress: bool,
        log_every: int,
        observer: BatchObserver | None = None,
    ) -> None:
        self.config, self.cache, self.source, self.split = config, cache, source, split
        self.observer = observer
        self.fold, self.fold_dir, self.dist = fold, fold_dir, dist
        self.max_steps, self.resume, self.progress, self.log_every = max_steps, resume, progress, log_every
        train_ids, val_ids = split.train_val(fold)
        if not train_ids or not val_ids:
            raise ValueError(f"Fold {fold} has {len(train_ids)} training and {len(val_ids)} validation images.")
        self.train_idx = cache.indices(train_ids)
        self.val_idx = cache.indices(val_ids)
        self.device = dist.device
        runtime = config.runtime
        self.precision = runtime.precision if self.device.type == "cuda" else "fp32"
        self.channels_last = runtime.channels_last

    def _build(self) -> None:
        config, dist = self.config, self.dist
        torch.manual_seed(config.seed + 1009 * self.fold)  # same initial weights on every rank
        network = build_network(
            config.network.architecture,
            config.network.encoder,
            layer_dropout=config.network.layer_dropout,
            decoder_channels=config.network.decoder_channels,
        )
        if dist.is_main:
            self.encoder_init = load_encoder_weights(network, config.network)
        dist.barrier()
        if not dist.is_main:
            self.encoder_init = load_encoder_weights(network, config.network)
        _freeze_unused_parameters(network)
        network = network.to(self.device)
        if self.channels_last:
            network = network.to(memory_format=torch.channels_last)
        self.network = network
        model: nn.Module = network
        if dist.enabled:
            model = nn.parallel.DistributedDataParallel(
                network, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if config.runtime.compile and self.device.type == "cuda":
            model = torch.compile(model, mode=None if config.runtime.compile_mode == "default" else config.runtime.compile_mode)
        self.model = model
        optim = config.optim
        optimizer_class = torch.optim.AdamW if optim.optimizer == "adamw" else torch.optim.Adam
        extra = {"fused": True} if self.device.type == "cuda" else {}
        trainable = [p for p in network.parameters() if p.requires_grad]
        self.optimizer = optimizer_class(trainable, lr=optim.lr, weight_decay=optim.weight_decay, **extra)
        self.global_batch = min(optim.batch_size, len(self.train_idx))
        self.global_batch -= self.global_batch % dist.world_size
        if self.global_batch < dist.world_size:
            raise ValueError(f"{len(self.train_idx)} training images cannot feed {dist.world_size} processes.")
        self.steps_per_epoch = max(1, len(self.train_idx) // self.global_batch)
        self.total_steps = optim.epochs * self.steps_per_epoch
        if self.max_steps is not None:
            self.total_steps = min(self.total_steps, self.max_steps)
        floor = optim.min_lr / optim.lr if optim.scheduler == "cosine" else 1.0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(self.total_steps, optim.warmup_steps, floor)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.criterion = ComboLoss(config.loss).to(self.device)
        host_augment, self.augment = build_augmentations(config.augment, config.input_size, config.seed + self.fold)
        self.source_batches = BatchSource(self.cache, self.device, config.runtime, host_augment=host_augment,
                                          observer=self.observer)
        torch.manual_seed(config.seed * 7919 + 104729 * self.fold + dist.rank)  # augmentation draws differ per rank

    # -------------------------------------------------------------- state

    def _state_path(self) -> Path:
        return self.fold_dir / LAST_STATE

    def _save_state(self) -> None:
        state = {
            "config": self.config.model_dump(mode="json"),
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "stopped": self.stopped,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        partial = self._state_path().with_suffix(".partial")
        torch.save(state, partial)
        partial.replace(self._state_path())

    def _load_state(self) -> bool:
        path = self._state_path()
        if not (self.resume and path.is_file()):
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["config"] != self.config.model_dump(mode="json"):
            raise ValueError(
                f"{path} was written by a different recipe; pass a new --out directory or --no-resume."
            )
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.bad_epochs, self.history, self.stopped = state["bad_epochs"], state["history"], state["stopped"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        return True

    # -------------------------------------------------------------- steps

    def _validate(self) -> dict[str, float]:
        totals = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss*n, dice, iou, n
        mine = self.val_idx[self.dist.rank :: self.dist.world_size]
        tta = self.config.early_stopping.validation_tta and "hflip" in self.config.tta
        for logits, probability, masks in predict_probabilities(
            self.network, self.source_batches, mine, batch_size=self.config.runtime.eval_batch_size,
            tta=tta, precision=self.precision, channels_last=self.channels_last, purpose="validation",
        ):
            dice, iou = _per_image_scores(probability, masks)
            n = masks.shape[0]
            totals[0] += self.criterion(logits, masks).double() * n
            totals[1] += dice.double().sum()
            totals[2] += iou.double().sum()
            totals[3] += n
        self.dist.all_reduce_sum(totals)
        n = max(totals[3].item(), 1.0)
        return {"val_loss": totals[0].item() / n, "val_dice": totals[1].item() / n, "val_iou": totals[2].item() / n}

    def _step(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a device batch; returns the detached loss (no host sync)."""
        images, masks = self.augment(images, masks)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(self.device, self.precision):
            logits = self.model(images)
        loss = self.criterion(logits, masks)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        clip = self.config.optim.grad_clip_norm
        if clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.network.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def _train_epoch(self, bar: Any) -> dict[str, float]:
        config, dist = self.config, self.dist
        order = epoch_order(
            self.train_idx, self.cache.positive[self.train_idx], epoch=self.epoch,
            total_epochs=config.optim.epochs, options=config.sampler, seed=config.seed + self.fold,
        )
        batches = shard_batches(order, batch_size=self.global_batch, rank=dist.rank, world_size=dist.world_size)
        remaining = self.total_steps - self.global_step
        batches = batches[:remaining]
        self.network.train()
        loss_sum = torch.zeros((), device=self.device)
        steps = 0
        window_start, window_images = time.perf_counter(), 0
        epoch_start = time.perf_counter()
        for images, masks in self.source_batches.batches(batches, purpose="train", augment=True):
            loss_sum += self._step(images, masks)
            steps += 1
            self.global_step += 1
            window_images += self.global_batch
            if steps % self.log_every == 0 or steps == len(batches):
                mean_loss = loss_sum.item() / steps  # the only host sync in the loop
                elapsed = time.perf_counter() - window_start
                bar.update(steps - bar.n + self._bar_offset)
                bar.set_postfix(
                    loss=f"{mean_loss:.4f}",
                    val_dice=f"{self.history[-1]['val_dice']:.4f}" if self.history else "-",
                    img_s=f"{window_images / max(elapsed, 1e-9):.1f}",
                    lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                )
                window_start, window_images = time.perf_counter(), 0
        self._bar_offset += steps
        duration = time.perf_counter() - epoch_start
        return {
            "train_loss": loss_sum.item() / max(steps, 1),
            "steps": steps,
            "images_per_s": steps * self.global_batch / max(duration, 1e-9),
            "epoch_seconds": duration,
        }

    def _manifest(self, postprocess: dict[str, Any], metrics: dict[str, Any]) -> Manifest:
        config = self.config
        assert self.source is not None, "a manifest needs the data source"
        n_train, n_val = len(self.train_idx), len(self.val_idx)
        training_data = _training_data(self.source, self.cache, self.split, self.fold, n_train, n_val)
        training_data["encoder_init"] = self.encoder_init
        return Manifest(
            name=config.model_name or config.name,
            version=config.version,
            architecture=config.network.architecture,
            encoder=config.network.encoder,
            decoder_channels=list(config.network.decoder_channels) if config.network.decoder_channels else None,
            caveat=config.caveat,
            input_size=config.input_size,
            preprocess=config.preprocess_config.to_dict(),
            postprocess=postprocess,
            tta=list(config.tta),
            training_data=training_data,
            metrics=metrics,
            changelog=f"Trained with ptx-train recipe {config.name!r} (fold {self.fold}).",
        )

    def _save_best(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            from model.postprocess import PostprocessConfig

            metrics = {"validation_net": {k: record[k] for k in ("val_loss", "val_dice", "val_iou")},
                       "epoch": record["epoch"], "step": record["step"]}
            save_checkpoint(self.fold_dir / BEST_DIR, self.network, self._manifest(PostprocessConfig().to_dict(), metrics))

    # -------------------------------------------------------------- run

    def run(self) -> FoldResult:
        from tqdm.auto import tqdm

        self.fold_dir.mkdir(parents=True, exist_ok=True)
        self._build()
        self.epoch, self.global_step = 0, 0
        self.best_value: float | None = None
        self.best_epoch, self.bad_epochs, self.stopped = -1, 0, False
        self.history: list[dict[str, Any]] = []
        resumed = self._load_state()
        early = self.config.early_stopping
        bar = tqdm(
            total=self.total_steps, initial=self.global_step, unit="step", dynamic_ncols=True,
            desc=f"fold {self.fold}", disable=not (self.progress and self.dist.is_main),
        )
        self._bar_offset = self.global_step
        if resumed and self.dist.is_main:
            bar.write(f"resumed fold {self.fold} at epoch {self.epoch}, step {self.global_step}")
        try:
            while not self.stopped and self.epoch < self.config.optim.epochs and self.global_step < self.total_steps:
                train_stats = self._train_epoch(bar)
                val_stats = self._validate()
                record = {"epoch": self.epoch, "step": self.global_step, "lr": self.scheduler.get_last_lr()[0],
                          **train_stats, **val_stats}
                self.history.append(record)
                value = val_stats[f"val_{early.monitor.value}"]
                if _is_better(value, self.best_value, early.monitor, early.min_delta):
                    self.best_value, self.best_epoch, self.bad_epochs = value, self.epoch, 0
                    self._save_best(record)
                else:
                    self.bad_epochs += 1
                self.stopped = self.dist.any(self.bad_epochs >= early.patience)
                self.epoch += 1
                if self.dist.is_main:
                    (self.fold_dir / HISTORY_FILE).write_text(json.dumps(self.history, indent=1))
                    self._save_state()
                bar.set_postfix(loss=f"{train_stats['train_loss']:.4f}", val_dice=f"{val_stats['val_dice']:.4f}",
                                val_iou=f"{val_stats['val_iou']:.4f}", img_s=f"{train_stats['images_per_s']:.1f}")
                self.dist.barrier()
        finally:
            bar.close()
        search, validation = self._finish()
        self.source_batches.close()
        return FoldResult(
            fold=self.fold, best_epoch=self.best_epoch, best_value=float(self.best_value or 0.0),
            monitor=early.monitor.value, steps=self.global_step, checkpoint=self.fold_dir / BEST_DIR,
            search=search, history=self.history, validation=validation,
        )

    def _finish(self) -> tuple[SearchResult | None, dict[str, Any]]:
        """Rank 0: best weights -> validation probabilities (plain and hflip TTA) -> a threshold
        search for each, tuned for itself -> manifest serving the recipe's TTA setting."""
        if not self.dist.is_main:
            self.dist.barrier()
            return None, {}
        state, manifest = load_checkpoint(self.fold_dir / BEST_DIR)
        self.network.load_state_dict(state)
        size = self.config.input_size
        n_val = len(self.val_idx)
        probabilities = {tta: np.empty((n_val, size, size), np.float16) for tta in (False, True)}
        truths = np.empty((n_val, size, size), bool)
        for tta in (False, True):
            position = 0
            for _, probability, masks in predict_probabilities(
                self.network, self.source_batches, self.val_idx, batch_size=self.config.runtime.eval_batch_size,
                tta=tta, precision=self.precision, channels_last=self.channels_last, purpose="threshold_search",
            ):
                n = masks.shape[0]
                probabilities[tta][position : position + n] = probability[:, 0].cpu().numpy()
                truths[position : position + n] = masks[:, 0].cpu().numpy() > 0.5
                position += n
        use_tta = "hflip" in self.config.tta
        scale = self.cache.ref_px_per_net_px[self.val_idx]
        searches = {tta: search_postprocess(probabilities[tta].astype(np.float32), truths, scale,
                                            self.config.threshold_search) for tta in (False, True)}
        search = searches[use_tta]
        validation = {"split": "validation", "tta": use_tta, "searched_score": search.score,
                      "objective": search.objective.value, "searched_dice": search.score}
        for tta in (False, True):
            dice, iou = _per_image_scores(torch.from_numpy(probabilities[tta].astype(np.float32)), torch.from_numpy(truths))
            validation["tta_hflip" if tta else "plain"] = {
                "dice_at_0.5": float(dice.mean()), "iou_at_0.5": float(iou.mean()),
                "searched_score": searches[tta].score, "postprocess": searches[tta].config.to_dict(),
            }
        metrics = dict(manifest.metrics)
        metrics.update({
            "validation": validation, "threshold_search": search.to_dict(),
            # each inference setting with the thresholds tuned for itself (ptx-train evaluate)
            "postprocess_by_mode": {"plain": searches[False].config.to_dict(), "tta": searches[True].config.to_dict()},
        })
        if self.config.evaluation.score_size:
            metrics["evaluation_protocol"] = {"score_size": self.config.evaluation.score_size}
        save_checkpoint(self.fold_dir / BEST_DIR, self.network, self._manifest(search.config.to_dict(), metrics))
        self.dist.barrier()
        return search, validation


# --------------------------------------------------------------------------- throughput


def measure_throughput(
    config: TrainConfig,
    cache: CachedSet,
    *,
    device: str | None = None,
    warmup_steps: int = 20,
    steps: int = 50,
) -> dict[str, Any]:
    """End-to-end training speed of this loop (batch gather + augmentation + step).

    Runs exactly the steps :func:`train` runs (same ``_FoldRun``), without validation or
    checkpoints; the clock starts after ``warmup_steps`` (compilation, cuDNN autotuning).
    """
    if steps < 1 or warmup_steps < 0:
        raise ValueError("steps must be >= 1 and warmup_steps >= 0.")
    dist = DistContext.from_env(device)
    split = holdout_split(cache.image_ids, cache.positive, val_fraction=config.split.val_fraction,
                          seed=config.split.seed)
    run = _FoldRun(config, cache, None, split, 0, None, dist, max_steps=None, resume=False,
                   progress=False, log_every=1 << 30)
    run._build()
    batches: list[np.ndarray] = []
    epoch = 0
    while len(batches) < warmup_steps + steps:
        order = epoch_order(run.train_idx, cache.positive[run.train_idx], epoch=epoch,
                            total_epochs=config.optim.epochs, options=config.sampler, seed=config.seed)
        batches += shard_batches(order, batch_size=run.global_batch, rank=dist.rank, world_size=dist.world_size)
        epoch += 1
    batches = batches[: warmup_steps + steps]

    def synchronize() -> None:
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)

    run.network.train()
    loss_sum = torch.zeros((), device=run.device)
    started = time.perf_counter()
    for index, (images, masks) in enumerate(run.source_batches.batches(batches, augment=True)):
        if index == warmup_steps:
            synchronize()
            started = time.perf_counter()
        loss_sum += run._step(images, masks)
    synchronize()
    elapsed = time.perf_counter() - started
    final_loss = loss_sum.item() / len(batches)
    run.source_batches.close()
    dist.close()
    images_per_s = steps * run.global_batch / elapsed
    return {
        "images_per_s": images_per_s,
        "step_ms": 1000 * elapsed / steps,
        "steps": steps,
        "warmup_steps": warmup_steps,
        "global_batch": run.global_batch,
        "world_size": dist.world_size,
        "data_on_device": run.source_batches.on_device,
        "precision": run.precision,
        "compile": bool(config.runtime.compile and run.device.type == "cuda"),
        "channels_last": run.channels_last,
        "mean_loss": final_loss,
    }


# --------------------------------------------------------------------------- entry point


def train(
    config: TrainConfig,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    device: str | None = None,
    max_steps: int | None = None,
    folds: list[int] | None = None,
    cache_dir: str | Path | None = None,
    labels_file: str | Path | None = None,
    split_file: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    log_every: int = 20,
    observer: BatchObserver | None = None,
    evaluate_test: bool = True,
) -> TrainResult:
    """Train every requested fold of ``config`` and write the served checkpoint to ``out/checkpoint``.

    The fold served is the one with the best validation search score. When the split has a
    test set, the served checkpoint is then evaluated on it (``out/test-evaluation``): the
    only numbers that come from images no choice was made on. ``observer`` sees every batch
    the loader serves.
    """
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}.")
    out_dir = Path(out_dir)
    source = discover(data_root, labels_file=labels_file)
    cache = None
    # Rank 0 builds the cache before CUDA starts, so its worker processes can fork.
    if int(os.environ.get("RANK", "0")) == 0:
        cache = build_cache(source, config.preprocess_config, cache_dir, workers=config.runtime.num_workers,
                            progress=progress)
    dist = DistContext.from_env(device)
    try:
        dist.barrier()
        if cache is None:
            cache = build_cache(source, config.preprocess_config, cache_dir, workers=0)
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=1))
            split = _prepare_split(config, cache, out_dir, Path(split_file) if split_file else None)
        dist.barrier()
        if not dist.is_main:
            split = read_split(out_dir / "split.json")
        fold_list = folds if folds is not None else list(range(split.n_folds))
        results = []
        for fold in fold_list:
            run = _FoldRun(config, cache, source, split, fold, out_dir / f"fold_{fold}", dist,
                           max_steps=max_steps, resume=resume, progress=progress, log_every=log_every,
                           observer=observer)
            results.append(run.run())
        summary: dict[str, Any] = {}
        final = out_dir / FINAL_CHECKPOINT
        ensemble = out_dir / ENSEMBLE_CHECKPOINT if config.serve.ensemble else None
        if dist.is_main:
            summary = _summarize(config, results)
            best = max(results, key=lambda r: r.search.score if r.search else -1.0)  # validation only
            _write_final(best, final, summary)
            if ensemble is not None:
                summary["ensemble"] = _write_ensemble(config, cache, split, results, best, ensemble, dist.device)
            if evaluate_test and split.test_ids():
                summary["test"] = _evaluate_test(final, data_root, out_dir / "test-evaluation", labels_file, config,
                                                 dist.device, progress)
                if ensemble is not None:
                    summary["ensemble_test"] = _evaluate_test(ensemble, data_root, out_dir / "test-evaluation-ensemble",
                                                              labels_file, config, dist.device, progress)
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            from trainer import report

            report.write_training_report(out_dir, config, results, summary)
        dist.barrier()
        return TrainResult(out_dir, final, results, summary, ensemble)
    finally:
        dist.close()


def _evaluate_test(
    checkpoint: Path, data_root: str | Path, evaluation_dir: Path, labels_file: str | Path | None,
    config: TrainConfig, device: torch.device, progress: bool,
) -> dict[str, Any]:
    """A served checkpoint on the test split, at source resolution (trainer.evaluate)."""
    from trainer.evaluate import evaluate

    result = evaluate(checkpoint, data_root, evaluation_dir, device=device.type,
                      split_file=evaluation_dir.parent / "split.json", subset="test", labels_file=labels_file,
                      batch_size=config.runtime.eval_batch_size, progress=progress)
    served = "tta" if config.tta else "plain"
    return {"split": "test", "served_mode": served, "report": str(result.report_path),
            "plain": result.metrics["plain"], "tta": result.metrics["tta"]}


def _summarize(config: TrainConfig, results: list[FoldResult]) -> dict[str, Any]:
    folds = []
    for result in results:
        folds.append({
            "fold": result.fold, "best_epoch": result.best_epoch, "best_value": result.best_value,
            "monitor": result.monitor, "steps": result.steps,
            "searched_dice": result.search.score if result.search else None,
            "postprocess": result.search.config.to_dict() if result.search else None,
            "validation": result.validation,
        })
    scores = [f["searched_dice"] for f in folds if f["searched_dice"] is not None]
    return {
        "recipe": config.name,
        "folds": folds,
        "cv_searched_dice_mean": float(np.mean(scores)) if scores else None,
        "cv_searched_dice_std": float(np.std(scores)) if scores else None,
    }


def _write_final(best: FoldResult, final: Path, summary: dict[str, Any]) -> None:
    """Copy the best fold's checkpoint and add the cross-validation summary to its manifest."""
    from model.checkpoint import read_manifest, write_manifest

    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(best.checkpoint, final)
    manifest = read_manifest(final)
    manifest.metrics = {**manifest.metrics, "cross_validation": {
        "selected_fold": best.fold,
        "cv_searched_dice_mean": summary["cv_searched_dice_mean"],
        "cv_searched_dice_std": summary["cv_searched_dice_std"],
        "n_folds_trained": len(summary["folds"]),
    }}
    write_manifest(final, manifest)


def _write_ensemble(
    config: TrainConfig, cache: CachedSet, split: Split, results: list[FoldResult], best: FoldResult,
    directory: Path, device: torch.device,
) -> dict[str, Any]:
    """Write every trained fold as one ensemble; search its postprocess on the tune split.

    Out-of-fold images are not clean for the ensemble (each was trained on by k-1 of its
    members), so the search runs on ``split.tune_ids()``, which no fold trained or validated
    on. Without a tune split the selected fold's own validation search is reused, and the
    manifest says so. The test split is never used here.
    """
    from model.checkpoint import read_manifest, save_ensemble, write_manifest
    from model.infer import Segmenter
    from trainer.evaluate import _probabilities as _both_views

    if len(results) < 2:
        raise ValueError(f"serve.ensemble needs at least 2 trained folds; this run trained {len(results)}.")
    members = {r.fold: r.checkpoint for r in results}
    if directory.exists():  # a rerun with fewer folds must not leave members behind
        shutil.rmtree(directory)
    selected = read_manifest(best.checkpoint)
    training_data = dict(selected.training_data)
    training_data["split"] = {**training_data["split"], "fold": None, "member_folds": sorted(members),
                              "tune_fraction": split.tune_fraction, "n_tune": len(split.tune_ids())}
    training_data["n_val"] = None  # each member validated on its own fold
    combine = ("mean of the members' sigmoid probabilities, each member first averaging its own TTA views "
               f"({', '.join(config.tta) or 'none'})")
    info: dict[str, Any] = {
        "member_folds": sorted(members), "combine": combine,
        "members": [{"fold": r.fold, "best_epoch": r.best_epoch,
                     "validation_searched_score": r.search.score if r.search else None} for r in results],
    }
    base = dataclasses.replace(
        selected, training_data=training_data, metrics={}, created="",
        changelog=f"Ensemble of folds {', '.join(map(str, sorted(members)))} of ptx-train recipe {config.name!r}.",
    )
    tune_ids = split.tune_ids()
    if not tune_ids:
        tuned_on = (f"not tuned for the ensemble: fold {best.fold}'s own validation search (one member's "
                    "probabilities) reused; set split.tune_fraction to search on images no member saw")
        info["postprocess_tuned_on"] = {"split": None, "reused_from_fold": best.fold}
        metrics = {"ensemble": info, "postprocess_by_mode": selected.metrics.get("postprocess_by_mode", {})}
        save_ensemble(directory, members, dataclasses.replace(base, metrics=metrics), postprocess_tuned_on=tuned_on)
        return info
    tuned_on = (f"tune split: {len(tune_ids)} images that no member trained or validated on "
                "(split.json fold -3), none of them test images")
    save_ensemble(directory, members, base, postprocess_tuned_on=tuned_on)  # provisional postprocess
    segmenter = Segmenter.from_checkpoint(directory, device=device, runtime="torch",
                                          max_batch_size=config.runtime.eval_batch_size)
    index = cache.indices(tune_ids)
    net_input = cache.images[index].astype(np.float32)
    truths = cache.masks[index] > 0
    scale = cache.ref_px_per_net_px[index]
    # Both modes' probabilities from one pass over the tune split (2 forwards per member), hflip
    # computed even when the recipe serves no TTA: evaluate.py scores its hflip column with "tta".
    views = {mode: np.empty_like(net_input) for mode in ("plain", "tta")}
    for start in range(0, len(net_input), segmenter.max_batch_size):
        chunk = _both_views(segmenter, net_input[start:start + segmenter.max_batch_size])
        for mode, probability in chunk.items():
            views[mode][start:start + len(probability)] = probability
    searches = {tta: search_postprocess(views["tta" if tta else "plain"], truths, scale, config.threshold_search)
                for tta in (False, True)}
    search = searches["hflip" in config.tta]
    info["postprocess_tuned_on"] = {"split": "tune", "n_images": len(tune_ids)}
    metrics = {
        "ensemble": info, "threshold_search": search.to_dict(),
        "tune": {"split": "tune", "n_images": len(tune_ids), "searched_score": search.score,
                 "objective": search.objective.value},
        "postprocess_by_mode": {"plain": searches[False].config.to_dict(), "tta": searches[True].config.to_dict()},
    }
    # the members are written and verified already: only the manifest changes
    write_manifest(directory, dataclasses.replace(read_manifest(directory), postprocess=search.config.to_dict(),
                                                  metrics=metrics))
    info["tune_searched_score"] = search.score
    return info

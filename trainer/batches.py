"""Which images each step sees (samplers) and how they reach the device (batch sources)."""

from __future__ import annotations

import concurrent.futures
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from trainer.config import RuntimeOptions, SamplerOptions
from trainer.data import CachedSet

__all__ = ["BatchObserver", "BatchSource", "epoch_order", "shard_batches"]

#: Called with (purpose, cache indices, images, masks) for every batch a source serves:
#: "train", "validation" (early stopping, checkpoint choice) or "threshold_search".
BatchObserver = Callable[[str, np.ndarray, torch.Tensor, torch.Tensor], None]


def epoch_order(
    indices: np.ndarray,
    positive: np.ndarray,
    *,
    epoch: int,
    total_epochs: int,
    options: SamplerOptions,
    seed: int,
) -> np.ndarray:
    """Cache indices for one epoch, same on every rank (seeded by ``seed`` and ``epoch``).

    ``positive_fraction`` draws ``len(indices)`` images of which the given share is positive,
    with replacement inside a class when it has too few (the SIIM-ACR winner's sampler).
    """
    rng = np.random.default_rng([seed, epoch])
    if len(indices) != len(positive):
        raise ValueError(f"Got {len(indices)} indices and {len(positive)} labels.")
    positives, negatives = indices[positive], indices[~positive]
    if options.kind == "shuffle" or len(positives) == 0 or len(negatives) == 0:
        return rng.permutation(indices)
    progress = epoch / max(1, total_epochs - 1)
    fraction = options.positive_fraction_start + (
        options.positive_fraction_end - options.positive_fraction_start
    ) * min(progress, 1.0)
    n_positive = int(round(fraction * len(indices)))
    n_negative = len(indices) - n_positive
    chosen = np.concatenate(
        [
            rng.choice(positives, n_positive, replace=n_positive > len(positives)),
            rng.choice(negatives, n_negative, replace=n_negative > len(negatives)),
        ]
    )
    return rng.permutation(chosen)


def shard_batches(
    order: np.ndarray, *, batch_size: int, rank: int, world_size: int, drop_last: bool = True
) -> list[np.ndarray]:
    """Split a global order into this rank's per-step batches (``batch_size`` is global)."""
    if batch_size % world_size:
        raise ValueError(f"Global batch size {batch_size} is not divisible by {world_size} processes.")
    per_rank = batch_size // world_size
    steps = len(order) // batch_size if drop_last else -(-len(order) // batch_size)
    batches = []
    for step in range(steps):
        chunk = order[step * batch_size : (step + 1) * batch_size]
        mine = chunk[rank::world_size]
        if len(mine) == 0:
            continue
        batches.append(mine[:per_rank])
    return batches


class BatchSource:
    """Yields ``(images (B, 1, S, S) float32, masks (B, 1, S, S) float32)`` on the device.

    On CUDA the whole cache is copied to GPU memory once when it fits (``data_on_device``),
    so a step costs one gather; otherwise host threads gather from the memory map into
    pinned buffers ahead of the step and copy them asynchronously. A ``host_augment``
    (albumentations, per sample) runs on those threads for training batches, and keeps the
    data on the host. ``observer`` sees every batch served (what split discipline is
    checked against).
    """

    def __init__(
        self,
        cache: CachedSet,
        device: torch.device,
        options: RuntimeOptions,
        *,
        host_augment: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self.cache = cache
        self.device = device
        self.options = options
        self.host_augment = host_augment
        self.observer = observer
        self.on_device = host_augment is None and self._decide_on_device()
        if self.on_device:
            with warnings.catch_warnings():  # read-only memory map: torch copies it to the GPU anyway
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                self._images = torch.from_numpy(cache.images).to(device)
                self._masks = torch.from_numpy(cache.masks).to(device)
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, options.num_workers))

    def _decide_on_device(self) -> bool:
        if self.device.type != "cuda" or self.options.data_on_device == "never":
            return False
        needed = self.cache.images.nbytes + self.cache.masks.nbytes
        if self.options.data_on_device == "always":
            return True
        free, _total = torch.cuda.mem_get_info(self.device)
        return needed < free // 4

    def _gather_host(self, batch: np.ndarray, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        order = np.argsort(batch)  # ascending reads are kinder to the page cache
        images = np.empty((len(batch), *self.cache.images.shape[1:]), np.float16)
        masks = np.empty((len(batch), *self.cache.masks.shape[1:]), np.uint8)
        images[order] = self.cache.images[batch[order]]
        masks[order] = self.cache.masks[batch[order]]
        if augment and self.host_augment is not None:
            augmented = [self.host_augment(image.astype(np.float32), mask) for image, mask in zip(images, masks, strict=True)]
            images = np.stack([image for image, _ in augmented]).astype(np.float16)
            masks = np.stack([mask for _, mask in augmented]).astype(np.uint8)
        images_t, masks_t = torch.from_numpy(images), torch.from_numpy(masks)
        if self.device.type == "cuda":
            images_t, masks_t = images_t.pin_memory(), masks_t.pin_memory()
        return images_t, masks_t

    def _finish(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True).unsqueeze(1).float()
        masks = masks.to(self.device, non_blocking=True).unsqueeze(1).float()
        return images, masks

    def batches(
        self, index_batches: Sequence[np.ndarray], *, purpose: str = "train", augment: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Device batches of ``index_batches``; ``augment`` applies the host augmentation."""
        for batch, (images, masks) in zip(index_batches, self._batches(index_batches, augment), strict=True):
            if self.observer is not None:
                self.observer(purpose, np.asarray(batch), images, masks)
            yield images, masks

    def _batches(self, index_batches: Sequence[np.ndarray], augment: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.on_device:
            for batch in index_batches:
                index = torch.from_numpy(np.asarray(batch, dtype=np.int64)).to(self.device, non_blocking=True)
                yield self._finish(self._images.index_select(0, index), self._masks.index_select(0, index))
            return
        depth = max(2, self.options.num_workers * 2)
        pending: deque[concurrent.futures.Future] = deque()
        iterator = iter(index_batches)
        for batch in iterator:
            pending.append(self._pool.submit(self._gather_host, np.asarray(batch), augment))
            if len(pending) >= depth:
                break
        while pending:
            images, masks = pending.popleft().result()
            next_batch = next(iterator, None)
            if next_batch is not None:
                pending.append(self._pool.submit(self._gather_host, np.asarray(next_batch), augment))
            yield self._finish(images, masks)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.on_device:
            del self._images, self._masks

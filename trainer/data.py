"""Training data: the three on-disk layouts, a one-time cache at training resolution, splits.

Every image goes through ``model.preprocess`` (the same code the node serves with), and
every mask through the same ``GeometricTransform.forward_mask``, so training and serving
never drift apart. The cache holds float16 network inputs and uint8 masks as ``.npy``
files opened memory-mapped, so epochs never decode DICOM or PNG again.
"""

from __future__ import annotations

import concurrent.futures
import enum
import hashlib
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from model.preprocess import (
    PreprocessConfig,
    SourceImage,
    preprocess,
    source_image_from_dataset,
    source_image_from_png,
)
from trainer import rle

__all__ = [
    "CACHE_FORMAT",
    "CachedSet",
    "DataSource",
    "ImageKind",
    "Layout",
    "Sample",
    "Split",
    "SplitKind",
    "TEST_FOLD",
    "TUNE_FOLD",
    "build_cache",
    "cache_from_arrays",
    "default_cache_dir",
    "discover",
    "holdout_split",
    "kfold_split",
    "load_sample",
    "read_split",
    "write_split",
]

CACHE_FORMAT = 1
SIIM_LABEL_FILES = ("stage_2_train.csv", "train-rle.csv")  # stage 2 labels more images
_AREA_REFERENCE = 1024  # model.postprocess counts areas at 1024 x 1024


class Layout(enum.StrEnum):
    SIIM_DICOM = "siim-dicom"  # DICOM tree + train-rle.csv / stage_2_train.csv
    SIIM_PNG = "siim-png"  # png_images/ + png_masks/ (masks 0/255)
    PTX498 = "ptx498"  # SiteA/B/C with N.1.img.png + N.2.mask.png


class ImageKind(enum.StrEnum):
    DICOM = "dicom"
    PNG = "png"


@dataclass(frozen=True)
class Sample:
    """One labelled image on disk."""

    image_id: str
    image_path: Path
    kind: ImageKind
    mask_path: Path | None = None  # PNG layouts
    rle_rows: tuple[str, ...] = ()  # SIIM DICOM layout
    rle_encoding: rle.RleEncoding = rle.RleEncoding.RELATIVE
    rle_absolute_start: int = 0  # first pixel index of an absolute RLE file (0 or 1)
    group: str = ""  # PTX-498 site

    @property
    def positive_from_labels(self) -> bool | None:
        """Known without reading pixels for RLE labels; None for PNG masks."""
        if self.kind is ImageKind.DICOM:
            return any(row.strip() not in ("", rle.EMPTY_RLE) for row in self.rle_rows)
        return None


@dataclass(frozen=True)
class DataSource:
    root: Path
    layout: Layout
    samples: tuple[Sample, ...]
    labels_file: Path | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def describe(self) -> dict[str, Any]:
        """What the checkpoint manifest records about its training data."""
        return {
            "layout": self.layout.value,
            "root": str(self.root),
            "labels_file": self.labels_file.name if self.labels_file else None,
            "n_images": len(self.samples),
            "skipped": dict(self.skipped),
        }


def _find_label_file(root: Path) -> Path | None:
    for name in SIIM_LABEL_FILES:
        for candidate in (root / name, *root.glob(f"*/{name}")):
            if candidate.is_file():
                return candidate
    return None


#: Environment setting for the absolute-RLE convention (see trainer.rle.decode).
RLE_ABSOLUTE_START_ENV = "PTX_TRAIN_RLE_ABSOLUTE_START"


def _rle_absolute_start() -> int:
    value = os.environ.get(RLE_ABSOLUTE_START_ENV, "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{RLE_ABSOLUTE_START_ENV} must be 0 or 1, got {value!r}.")
    return int(value)


def _discover_siim_dicom(root: Path, labels_file: Path) -> DataSource:
    table = rle.read_rle_csv(labels_file)
    start = _rle_absolute_start() if table.encoding is rle.RleEncoding.ABSOLUTE else 0
    files = {path.stem: path for path in root.rglob("*.dcm")}
    samples = []
    for image_id in table.image_ids:
        path = files.get(image_id)
        if path is None:
            continue
        samples.append(
            Sample(image_id, path, ImageKind.DICOM, rle_rows=table.rows[image_id], rle_encoding=table.encoding,
                   rle_absolute_start=start)
        )
    skipped = {}
    if len(samples) < len(table.image_ids):
        skipped["labelled but no DICOM file"] = len(table.image_ids) - len(samples)
    unlabelled = len(set(files) - set(table.rows))
    if unlabelled:
        skipped["DICOM file without labels"] = unlabelled
    return DataSource(root, Layout.SIIM_DICOM, tuple(samples), labels_file, skipped)


def _discover_siim_png(root: Path) -> DataSource:
    image_dir, mask_dir = root / "png_images", root / "png_masks"
    samples, missing = [], 0
    for path in sorted(image_dir.glob("*.png")):
        mask_path = mask_dir / path.name
        if not mask_path.is_file():
            missing += 1
            continue
        samples.append(Sample(path.stem, path, ImageKind.PNG, mask_path=mask_path))
    skipped = {"image without mask": missing} if missing else {}
    return DataSource(root, Layout.SIIM_PNG, tuple(samples), None, skipped)


def _discover_ptx498(root: Path, sites: Sequence[Path]) -> DataSource:
    samples, missing = [], 0
    for site in sites:
        for path in sorted(site.rglob("*.1.img.png")):
            number = path.name[: -len(".1.img.png")]
            mask_path = path.with_name(f"{number}.2.mask.png")
            if not mask_path.is_file():
                missing += 1
                continue
            relative = path.parent.relative_to(root).as_posix()
            samples.append(
                Sample(f"{relative}/{number}", path, ImageKind.PNG, mask_path=mask_path, group=site.name)
            )
    skipped = {"image without mask": missing} if missing else {}
    return DataSource(root, Layout.PTX498, tuple(samples), None, skipped)


def discover(root: str | Path, *, labels_file: str | Path | None = None) -> DataSource:
    """Recognize the layout under ``root`` and list its labelled images."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"Data directory {str(root)!r} does not exist.")
    if (root / "png_images").is_dir() and (root / "png_masks").is_dir():
        source = _discover_siim_png(root)
    elif sites := sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("site")):
        source = _discover_ptx498(root, sites)
    else:
        label_path = Path(labels_file) if labels_file else _find_label_file(root)
        if label_path is None:
            raise ValueError(
                f"{str(root)!r} matches no known layout: expected png_images/ + png_masks/, "
                f"SiteA/SiteB/SiteC folders, or a DICOM tree with {' or '.join(SIIM_LABEL_FILES)}."
            )
        source = _discover_siim_dicom(root, label_path)
    if not source.samples:
        raise ValueError(f"No labelled images found under {str(root)!r} ({source.layout.value} layout).")
    return source


def _read_png_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    data = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if data is None:
        raise ValueError(f"Could not read mask {str(path)!r}.")
    if data.shape != shape:
        raise ValueError(f"Mask {str(path)!r} has shape {data.shape}, image has {shape}.")
    peak = int(data.max())
    # 0/255 masks (SIIM PNG copy) and 0/1 masks both happen.
    return data > (peak // 2) if peak else np.zeros(shape, bool)


def load_sample(sample: Sample) -> tuple[SourceImage, np.ndarray]:
    """Decode one sample: (display-normalized source image, bool mask on the source grid)."""
    if sample.kind is ImageKind.DICOM:
        import pydicom

        source = source_image_from_dataset(pydicom.dcmread(sample.image_path))
        mask = np.zeros(source.shape, bool)
        for row in sample.rle_rows:
            mask |= rle.decode(row, source.shape, encoding=sample.rle_encoding,
                               absolute_start=sample.rle_absolute_start)
        return source, mask
    source = source_image_from_png(sample.image_path)
    if sample.mask_path is None:
        raise ValueError(f"PNG sample {sample.image_id!r} has no mask file.")
    return source, _read_png_mask(sample.mask_path, source.shape)


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    base = os.environ.get("PTX_TRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ptx-train"
    )
    return Path(base)


@dataclass
class CachedSet:
    """Preprocessed images (float16) and masks (uint8) at network resolution, memory-mapped."""

    directory: Path
    image_ids: list[str]
    positive: np.ndarray  # bool (N,)
    images: np.ndarray  # float16 (N, S, S)
    masks: np.ndarray  # uint8 (N, S, S), 0/1
    source_shapes: np.ndarray  # int (N, 2)
    ref_px_per_net_px: np.ndarray  # float (N,): 1024x1024-reference pixels per network pixel
    preprocess: PreprocessConfig
    description: dict[str, Any]

    def __len__(self) -> int:
        return len(self.image_ids)

    def indices(self, image_ids: Sequence[str]) -> np.ndarray:
        lookup = {image_id: index for index, image_id in enumerate(self.image_ids)}
        missing = [i for i in image_ids if i not in lookup]
        if missing:
            raise ValueError(f"{len(missing)} split images are not in the cache, e.g. {missing[0]!r}.")
        return np.array([lookup[i] for i in image_ids], dtype=np.int64)


def _cache_key(source: DataSource, cfg: PreprocessConfig) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT, "preprocess": cfg.to_dict()}, sort_keys=True).encode())
    for sample in source.samples:
        stat = sample.image_path.stat()
        digest.update(f"{sample.image_id}|{sample.image_path}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
        digest.update(f"{sample.rle_encoding}{sample.rle_absolute_start}|".encode() + "|".join(sample.rle_rows).encode())
        if sample.mask_path is not None:
            mask_stat = sample.mask_path.stat()
            digest.update(f"{mask_stat.st_size}|{mask_stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _reference_scale(transform: Any, size: int) -> float:
    """Reference (1024^2) pixels covered by one network pixel of this image."""
    height, width = transform.source_shape
    covered = float(height * width)
    for step in transform.steps:
        if getattr(step, "kind", "") == "crop":
            covered = float((step.bottom - step.top) * (step.right - step.left))
    return covered / (size * size) * (_AREA_REFERENCE**2) / float(height * width)


def _cache_chunk(
    directory: str, samples: list[Sample], indices: list[int], cfg_dict: dict[str, Any]
) -> list[tuple[int, bool, int, int, float]]:
    """Worker: preprocess ``samples`` into rows ``indices`` of the open-on-disk arrays."""
    cfg = PreprocessConfig.from_dict(cfg_dict)
    images = np.load(Path(directory) / "images.partial.npy", mmap_mode="r+")
    masks = np.load(Path(directory) / "masks.partial.npy", mmap_mode="r+")
    results = []
    for sample, index in zip(samples, indices, strict=True):
        try:
            source, mask_src = load_sample(sample)
        except Exception as error:  # name the file: a bad file among 12,000 must be findable
            raise ValueError(f"Cannot load {sample.image_id!r} ({sample.image_path}): {error}") from error
        net, transform = preprocess(source, cfg)
        mask_net = transform.forward_mask(mask_src)
        images[index] = net.astype(np.float16)
        masks[index] = mask_net.astype(np.uint8)
        results.append(
            (index, bool(mask_src.any()), source.shape[0], source.shape[1],
             _reference_scale(transform, cfg.input_size))
        )
    images.flush()
    masks.flush()
    return results


def _open_cache(directory: Path) -> CachedSet:
    index = json.loads((directory / "index.json").read_text())
    return CachedSet(
        directory=directory,
        image_ids=list(index["image_ids"]),
        positive=np.array(index["positive"], dtype=bool),
        images=np.load(directory / "images.npy", mmap_mode="r"),
        masks=np.load(directory / "masks.npy", mmap_mode="r"),
        source_shapes=np.array(index["source_shapes"], dtype=np.int64).reshape(-1, 2),
        ref_px_per_net_px=np.array(index["ref_px_per_net_px"], dtype=np.float64),
        preprocess=PreprocessConfig.from_dict(index["preprocess"]),
        description=index["description"],
    )


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork (fast: no re-import of the caller's main module) unless CUDA is live in this process."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return multiprocessing.get_context("spawn")
    return multiprocessing.get_context("fork")


def build_cache(
    source: DataSource,
    cfg: PreprocessConfig,
    cache_root: str | Path | None = None,
    *,
    workers: int = 0,
    progress: bool = False,
) -> CachedSet:
    """Preprocess every sample once (reused when data and preprocessing are unchanged)."""
    cache_root = Path(cache_root) if cache_root else default_cache_dir()
    directory = cache_root / f"{source.layout.value}-{cfg.input_size}-{_cache_key(source, cfg)}"
    if (directory / "index.json").is_file():
        return _open_cache(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n, size = len(source.samples), cfg.input_size
    np.lib.format.open_memmap(directory / "images.partial.npy", "w+", np.float16, (n, size, size)).flush()
    np.lib.format.open_memmap(directory / "masks.partial.npy", "w+", np.uint8, (n, size, size)).flush()
    samples = list(source.samples)
    chunk = max(1, min(64, math.ceil(n / max(1, workers * 4))))
    jobs = [(samples[i : i + chunk], list(range(i, min(i + chunk, n)))) for i in range(0, n, chunk)]
    results: list[tuple[int, bool, int, int, float]] = []
    bar = _progress(n, "cache", progress)
    if workers > 0:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
            futures = [pool.submit(_cache_chunk, str(directory), s, i, cfg.to_dict()) for s, i in jobs]
            for future in concurrent.futures.as_completed(futures):
                part = future.result()
                results.extend(part)
                bar.update(len(part))
    else:
        for s, i in jobs:
            part = _cache_chunk(str(directory), s, i, cfg.to_dict())
            results.extend(part)
            bar.update(len(part))
    bar.close()
    results.sort()
    os.replace(directory / "images.partial.npy", directory / "images.npy")
    os.replace(directory / "masks.partial.npy", directory / "masks.npy")
    index = {
        "format": CACHE_FORMAT,
        "preprocess": cfg.to_dict(),
        "image_ids": [s.image_id for s in samples],
        "positive": [r[1] for r in results],
        "source_shapes": [[r[2], r[3]] for r in results],
        "ref_px_per_net_px": [r[4] for r in results],
        "description": source.describe(),
    }
    # index.json last: its presence marks a complete cache.
    partial = directory / "index.json.partial"
    partial.write_text(json.dumps(index))
    os.replace(partial, directory / "index.json")
    return _open_cache(directory)


def cache_from_arrays(
    directory: str | Path,
    images: np.ndarray,
    masks: np.ndarray,
    cfg: PreprocessConfig,
    *,
    image_ids: Sequence[str] | None = None,
    source_shape: tuple[int, int] | None = None,
    description: dict[str, Any] | None = None,
) -> CachedSet:
    """A cache from arrays already at network resolution (benchmarks, tests).

    ``images`` must be preprocessed network inputs (N, S, S) with S = ``cfg.input_size``.
    """
    size = cfg.input_size
    if images.ndim != 3 or images.shape[1:] != (size, size) or masks.shape != images.shape:
        raise ValueError(
            f"Need images and masks of shape (N, {size}, {size}), got {images.shape} and {masks.shape}."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = len(images)
    ids = list(image_ids) if image_ids is not None else [f"image{i:06d}" for i in range(n)]
    height, width = source_shape or (size, size)
    np.save(directory / "images.npy", images.astype(np.float16))
    np.save(directory / "masks.npy", masks.astype(np.uint8))
    index = {
        "format": CACHE_FORMAT,
        "preprocess": cfg.to_dict(),
        "image_ids": ids,
        "positive": [bool(m.any()) for m in masks],
        "source_shapes": [[height, width]] * n,
        "ref_px_per_net_px": [(_AREA_REFERENCE**2) / float(size * size)] * n,
        "description": description or {"layout": "arrays", "n_images": n},
    }
    (directory / "index.json").write_text(json.dumps(index))
    return _open_cache(directory)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


# --------------------------------------------------------------------------- splits


class SplitKind(enum.StrEnum):
    HOLDOUT = "holdout"
    KFOLD = "kfold"


#: Fold number of the test split: no fold's training or validation ever includes it.
TEST_FOLD = -2
#: Fold number of a k-fold run's tune split: no fold trains or validates on it, so a fold
#: ensemble's postprocess can be searched there (out-of-fold images were trained on by k-1 members).
TUNE_FOLD = -3


@dataclass(frozen=True)
class Split:
    """Fold of every image; holdout: fold 0 is validation and -1 training; TEST_FOLD (-2) is test,
    TUNE_FOLD (-3) the k-fold ensemble's tune split."""

    kind: SplitKind
    seed: int
    n_folds: int
    fold_of: dict[str, int]
    positive: dict[str, bool]
    val_fraction: float | None = None
    test_fraction: float = 0.0
    tune_fraction: float = 0.0

    def train_val(self, fold: int = 0) -> tuple[list[str], list[str]]:
        """Training and validation images of ``fold``; test and tune images are in neither."""
        if not 0 <= fold < self.n_folds:
            raise ValueError(f"Fold {fold} does not exist; this split has folds 0..{self.n_folds - 1}.")
        val = [i for i, f in self.fold_of.items() if f == fold]
        train = [i for i, f in self.fold_of.items() if f != fold and f not in (TEST_FOLD, TUNE_FOLD)]
        return train, val

    def test_ids(self) -> list[str]:
        return [i for i, f in self.fold_of.items() if f == TEST_FOLD]

    def tune_ids(self) -> list[str]:
        return [i for i, f in self.fold_of.items() if f == TUNE_FOLD]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": self.kind.value,
            "seed": self.seed,
            "n_folds": self.n_folds,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "n_test": len(self.test_ids()),
        }
        if self.tune_fraction:  # absent otherwise: splits written before it keep their sha256
            data.update({"tune_fraction": self.tune_fraction, "n_tune": len(self.tune_ids())})
        data["images"] = [{"image_id": i, "positive": self.positive[i], "fold": f} for i, f in self.fold_of.items()]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Split:
        images = data["images"]
        return cls(
            kind=SplitKind(data["kind"]),
            seed=int(data["seed"]),
            n_folds=int(data["n_folds"]),
            fold_of={row["image_id"]: int(row["fold"]) for row in images},
            positive={row["image_id"]: bool(row["positive"]) for row in images},
            val_fraction=data.get("val_fraction"),
            test_fraction=float(data.get("test_fraction") or 0.0),
            tune_fraction=float(data.get("tune_fraction") or 0.0),
        )

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _stratified_order(
    image_ids: Sequence[str], positive: Sequence[bool], seed: int
) -> tuple[list[str], list[str]]:
    if len(image_ids) != len(positive):
        raise ValueError(f"Got {len(image_ids)} image ids and {len(positive)} labels.")
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("Image ids must be unique.")
    rng = np.random.default_rng(seed)
    ordered = sorted(zip(image_ids, positive, strict=True))  # input order must not matter
    positives = [i for i, p in ordered if p]
    negatives = [i for i, p in ordered if not p]
    return [positives[k] for k in rng.permutation(len(positives))], [
        negatives[k] for k in rng.permutation(len(negatives))
    ]


def _take_test(
    positives: list[str], negatives: list[str], test_fraction: float
) -> tuple[list[str], list[str], set[str]]:
    """Set ``test_fraction`` of positives and of negatives aside (at least one image)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}.")
    if test_fraction == 0.0:
        return positives, negatives, set()
    n_pos = round(len(positives) * test_fraction)
    n_neg = round(len(negatives) * test_fraction)
    if n_pos + n_neg == 0:
        n_neg, n_pos = (1, 0) if negatives else (0, 1)
    test = set(positives[:n_pos] + negatives[:n_neg])
    return positives[n_pos:], negatives[n_neg:], test


def holdout_split(
    image_ids: Sequence[str],
    positive: Sequence[bool],
    *,
    val_fraction: float = 0.15,
    seed: int = 42,
    test_fraction: float = 0.0,
) -> Split:
    """Validation gets ``val_fraction`` of positives and of negatives (at least one image);
    with ``test_fraction``, a test split stratified the same way is set aside first."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
    if len(image_ids) < 2 + (test_fraction > 0):
        raise ValueError("A holdout split needs at least 2 images (3 with a test split).")
    positives, negatives = _stratified_order(image_ids, positive, seed)
    n_all_pos, n_all_neg = len(positives), len(negatives)
    positives, negatives, test = _take_test(positives, negatives, test_fraction)
    # fractions of the whole set, so 70/15/15 means what it says
    n_val_pos = min(len(positives), round(n_all_pos * val_fraction))
    n_val_neg = min(len(negatives), round(n_all_neg * val_fraction))
    if n_val_pos + n_val_neg == 0:
        n_val_neg, n_val_pos = (1, 0) if negatives else (0, 1)
    if n_val_pos + n_val_neg == len(positives) + len(negatives):
        n_val_neg, n_val_pos = (n_val_neg - 1, n_val_pos) if n_val_neg else (0, n_val_pos - 1)
    val = set(positives[:n_val_pos] + negatives[:n_val_neg])
    if not val:
        raise ValueError("Too few images for a validation split next to the test split.")
    labels = dict(zip(image_ids, (bool(p) for p in positive), strict=True))
    fold_of = {i: (TEST_FOLD if i in test else 0 if i in val else -1) for i in sorted(image_ids)}
    return Split(SplitKind.HOLDOUT, seed, 1, fold_of, labels, val_fraction, test_fraction)


def kfold_split(
    image_ids: Sequence[str],
    positive: Sequence[bool],
    *,
    n_folds: int = 5,
    seed: int = 42,
    test_fraction: float = 0.0,
    tune_fraction: float = 0.0,
) -> Split:
    """Stratified k-fold: positives and negatives dealt round-robin to the folds, after a
    stratified test split (``test_fraction``) and then a tune split (``tune_fraction`` of the
    whole set, for a fold ensemble's postprocess) are set aside."""
    if n_folds < 2 or len(image_ids) < n_folds:
        raise ValueError(f"k-fold needs 2 <= folds <= images, got {n_folds} folds for {len(image_ids)} images.")
    if not 0.0 <= test_fraction + tune_fraction < 1.0:
        raise ValueError(f"test_fraction + tune_fraction must be in [0, 1), got {test_fraction + tune_fraction!r}.")
    positives, negatives = _stratified_order(image_ids, positive, seed)
    n_all = len(positives) + len(negatives)
    positives, negatives, test = _take_test(positives, negatives, test_fraction)
    tune: set[str] = set()
    if tune_fraction:  # fractions of the whole set, as holdout_split's val_fraction
        positives, negatives, tune = _take_test(positives, negatives, tune_fraction * n_all / (len(positives) + len(negatives)))
    if len(positives) + len(negatives) < n_folds:
        raise ValueError(f"{n_folds} folds need at least {n_folds} images outside the test and tune splits.")
    fold_of: dict[str, int] = {image_id: TEST_FOLD for image_id in test}
    fold_of.update({image_id: TUNE_FOLD for image_id in tune})
    for position, image_id in enumerate(positives + negatives):
        fold_of[image_id] = position % n_folds
    labels = dict(zip(image_ids, (bool(p) for p in positive), strict=True))
    return Split(SplitKind.KFOLD, seed, n_folds, dict(sorted(fold_of.items())), labels, None, test_fraction,
                 tune_fraction)


def write_split(path: str | Path, split: Split) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split.to_dict(), indent=1) + "\n")
    return path


def read_split(path: str | Path) -> Split:
    try:
        return Split.from_dict(json.loads(Path(path).read_text()))
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{str(path)!r} is not a split file: {error}") from error

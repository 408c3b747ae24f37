"""Checkpoint format: ``weights.safetensors`` + ``manifest.json`` (weights pinned by sha256).

Loading never touches the network and refuses what it does not understand.
torch is imported only inside the functions that move tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.postprocess import PostprocessConfig
from model.preprocess import PreprocessConfig

if TYPE_CHECKING:
    import torch

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILENAME",
    "WEIGHTS_FILENAME",
    "CheckpointError",
    "Manifest",
    "load_checkpoint",
    "read_manifest",
    "save_checkpoint",
    "sha256_file",
]

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
WEIGHTS_FILENAME = "weights.safetensors"
MANIFEST_FILENAME = "manifest.json"
KNOWN_TTA = ("hflip",)


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted or in a format this version cannot read."""


@dataclass
class Manifest:
    """What a checkpoint is, how its input must be prepared, and how it was made.

    ``preprocess``/``postprocess`` are the dicts of :class:`PreprocessConfig` /
    :class:`PostprocessConfig`. ``training_data`` and ``metrics`` are filled by the trainer.
    ``weights_sha256`` is set by :func:`save_checkpoint`.
    """

    name: str
    version: str
    architecture: str = "unetplusplus"
    encoder: str = "efficientnet-b4"
    input_size: int = 512
    preprocess: dict[str, Any] = field(default_factory=lambda: PreprocessConfig().to_dict())
    postprocess: dict[str, Any] = field(default_factory=lambda: PostprocessConfig().to_dict())
    tta: list[str] = field(default_factory=lambda: ["hflip"])
    in_channels: int = 1
    classes: int = 1
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    intended_use: str = (
        "Research use only: pneumothorax segmentation on frontal chest radiographs; "
        "not a medical device."
    )
    changelog: str = ""
    weights_sha256: str = ""
    created: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise CheckpointError(
                f"Checkpoint manifest format_version {self.format_version!r} is not supported by this "
                f"ptx-node (it reads format_version {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); "
                "upgrade ptx-node or re-export the checkpoint."
            )
        for name in ("name", "version"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise CheckpointError(f"Manifest.{name} must be a non-empty string.")
        try:
            preprocess = PreprocessConfig.from_dict(self.preprocess)
            PostprocessConfig.from_dict(self.postprocess)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"Manifest has invalid pre/post-processing parameters: {exc}") from exc
        if preprocess.input_size != self.input_size:
            raise CheckpointError(
                f"Manifest.input_size {self.input_size} differs from preprocess input_size "
                f"{preprocess.input_size}."
            )
        unknown_tta = [t for t in self.tta if t not in KNOWN_TTA]
        if unknown_tta:
            raise CheckpointError(
                f"Manifest.tta has unknown transforms {unknown_tta}; known: {', '.join(KNOWN_TTA)}."
            )

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)

    @property
    def postprocess_config(self) -> PostprocessConfig:
        return PostprocessConfig.from_dict(self.postprocess)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict):
            raise CheckpointError("Checkpoint manifest must be a JSON object.")
        version = data.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise CheckpointError(
                f"Checkpoint manifest format_version {version!r} is not supported by this ptx-node "
                f"(it reads format_version {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); "
                "upgrade ptx-node or re-export the checkpoint."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(
                f"Checkpoint manifest has fields this ptx-node does not understand: {', '.join(unknown)}."
            )
        missing = [n for n in ("name", "version", "weights_sha256") if n not in data]
        if missing:
            raise CheckpointError(f"Checkpoint manifest lacks required fields: {', '.join(missing)}.")
        try:
            return cls(**data)
        except TypeError as exc:
            raise CheckpointError(f"Checkpoint manifest is malformed: {exc}") from exc


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    directory: str | os.PathLike[str], network: torch.nn.Module, manifest: Manifest
) -> Path:
    """Write ``weights.safetensors`` and ``manifest.json`` (with the weights' sha256) into
    ``directory`` (created if needed) and return the directory path.

    The manifest object passed in is not modified; read it back with :func:`read_manifest`.
    """
    from safetensors.torch import save

    if not isinstance(manifest, Manifest):
        raise TypeError("save_checkpoint() needs a Manifest.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    module = getattr(network, "_orig_mod", network)  # torch.compile wrapper -> the real module
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    weights = save(state, metadata={"format": "pt"})
    weights_path = directory / WEIGHTS_FILENAME
    _atomic_write_bytes(weights_path, weights)
    written = dataclasses.replace(
        manifest,
        weights_sha256=hashlib.sha256(weights).hexdigest(),
        created=manifest.created or datetime.now(UTC).isoformat(timespec="seconds"),
    )
    text = json.dumps(written.to_dict(), indent=2, sort_keys=True) + "\n"
    _atomic_write_bytes(directory / MANIFEST_FILENAME, text.encode("utf-8"))
    return directory


def _checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.is_file() and path.name in (MANIFEST_FILENAME, WEIGHTS_FILENAME):
        return path.parent
    return path


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Parse and validate ``manifest.json`` (does not read the weights)."""
    manifest_path = _checkpoint_dir(directory) / MANIFEST_FILENAME
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"No {MANIFEST_FILENAME} in checkpoint {str(manifest_path.parent)!r}.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is not valid JSON: {exc}") from exc
    return Manifest.from_dict(data)


def load_checkpoint(directory: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], Manifest]:
    """Read a checkpoint, verifying the weights against the manifest's sha256."""
    from safetensors.torch import load

    directory = _checkpoint_dir(directory)
    manifest = read_manifest(directory)
    weights_path = directory / WEIGHTS_FILENAME
    try:
        weights = weights_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"No {WEIGHTS_FILENAME} in checkpoint {str(directory)!r}.") from None
    actual = hashlib.sha256(weights).hexdigest()
    if actual != manifest.weights_sha256:
        raise CheckpointError(
            f"Checkpoint weights {str(weights_path)!r} have sha256 {actual}, but the manifest pins "
            f"{manifest.weights_sha256 or '(none)'}; the file is corrupted or does not belong to this manifest."
        )
    try:
        state = load(weights)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"Checkpoint weights {str(weights_path)!r} cannot be parsed: {exc}") from exc
    return state, manifest

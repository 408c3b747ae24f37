"""Checkpoint format: ``weights.safetensors`` + ``manifest.json`` (weights pinned by sha256).

A fold ensemble (``format_version`` 2) is one directory too: ``manifest.json`` lists the
members under ``ensemble.members`` (fold, weights file, sha256), every member a
``fold_<k>.safetensors`` of the manifest's one architecture; ``weights_sha256`` is then the
digest of the members' list (:func:`ensemble_sha256`). Single-network checkpoints keep
``format_version`` 1 and read exactly as before.

Loading never touches the network and refuses what it does not understand.
torch is imported only inside the functions that move tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
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
    "ENSEMBLE_FORMAT_VERSION",
    "CheckpointError",
    "Manifest",
    "ensemble_sha256",
    "load_checkpoint",
    "load_ensemble",
    "load_weights",
    "read_manifest",
    "save_checkpoint",
    "save_ensemble",
    "sha256_file",
    "write_manifest",
]

FORMAT_VERSION = 1
#: Manifests with an ``ensemble`` section: an older ptx-node refuses them by version, with its
#: "upgrade ptx-node" message, instead of serving one member.
ENSEMBLE_FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
WEIGHTS_FILENAME = "weights.safetensors"
MANIFEST_FILENAME = "manifest.json"
KNOWN_TTA = ("hflip",)
#: How an ensemble combines its members: the mean of their (TTA-averaged) sigmoid probabilities.
KNOWN_COMBINE = ("mean_probability",)
ENSEMBLE_KEYS = ("combine", "members", "postprocess_tuned_on")
MEMBER_KEYS = ("fold", "weights_file", "weights_sha256")
#: Room the node's outputs keep after the version for " sha256:<12 hex>" in a 64-character LO.
MAX_SERVED_VERSION_LENGTH = 44
#: Manifest fields every member of an ensemble must share (checked by :func:`save_ensemble`).
SHARED_FIELDS = ("architecture", "encoder", "input_size", "preprocess", "tta", "in_channels", "classes",
                 "decoder_channels")
_MEMBER_FILE = re.compile(r"^fold_[0-9]+\.safetensors$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


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
    #: Decoder widths, deepest first; None: segmentation-models-pytorch's default.
    decoder_channels: list[int] | None = None
    #: A warning every output of this model carries (a demo model, ...); "" for none.
    caveat: str = ""
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    intended_use: str = (
        "Research use only: pneumothorax segmentation on frontal chest radiographs; "
        "not a medical device."
    )
    changelog: str = ""
    #: None: one network (``weights.safetensors``). A fold ensemble: {"combine": one of
    #: KNOWN_COMBINE, "members": [{"fold", "weights_file", "weights_sha256"}, ...],
    #: "postprocess_tuned_on": which images the postprocess was searched on, in words}.
    ensemble: dict[str, Any] | None = None
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
        if not isinstance(self.caveat, str) or len(self.caveat) > 64:
            raise CheckpointError("Manifest.caveat must be a string of at most 64 characters (a DICOM LO).")
        unknown_tta = [t for t in self.tta if t not in KNOWN_TTA]
        if unknown_tta:
            raise CheckpointError(
                f"Manifest.tta has unknown transforms {unknown_tta}; known: {', '.join(KNOWN_TTA)}."
            )
        self._check_ensemble()

    def _check_ensemble(self) -> None:
        if self.ensemble is None:
            if self.format_version == ENSEMBLE_FORMAT_VERSION:
                raise CheckpointError(
                    f"Manifest format_version {ENSEMBLE_FORMAT_VERSION} describes an ensemble but has no "
                    "ensemble section."
                )
            return
        ensemble = self.ensemble
        if self.format_version != ENSEMBLE_FORMAT_VERSION:
            raise CheckpointError(
                f"Manifest has an ensemble section, which needs format_version {ENSEMBLE_FORMAT_VERSION}, "
                f"not {self.format_version!r}."
            )
        if not isinstance(ensemble, dict) or sorted(ensemble) != sorted(ENSEMBLE_KEYS):
            raise CheckpointError(f"Manifest.ensemble must be an object with exactly {', '.join(ENSEMBLE_KEYS)}.")
        if ensemble["combine"] not in KNOWN_COMBINE:
            raise CheckpointError(
                f"Manifest.ensemble.combine {ensemble['combine']!r} is unknown; known: {', '.join(KNOWN_COMBINE)}."
            )
        if not isinstance(ensemble["postprocess_tuned_on"], str) or not ensemble["postprocess_tuned_on"].strip():
            raise CheckpointError("Manifest.ensemble.postprocess_tuned_on must say which images the "
                                  "postprocess was tuned on.")
        members = ensemble["members"]
        if not isinstance(members, list) or len(members) < 2:
            raise CheckpointError("Manifest.ensemble.members must list at least 2 members.")
        for member in members:
            if not isinstance(member, dict) or sorted(member) != sorted(MEMBER_KEYS):
                raise CheckpointError(f"Every ensemble member must be an object with exactly {', '.join(MEMBER_KEYS)}.")
            fold = member["fold"]
            if isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
                raise CheckpointError(f"Ensemble member fold {fold!r} must be a non-negative integer.")
            if member["weights_file"] != member_weights_filename(fold):
                raise CheckpointError(
                    f"Ensemble member fold {fold} must be stored as {member_weights_filename(fold)!r}, "
                    f"not {member['weights_file']!r}."
                )
            if not isinstance(member["weights_sha256"], str) or not _SHA256_HEX.match(member["weights_sha256"]):
                raise CheckpointError(f"Ensemble member fold {fold} needs a weights_sha256 of 64 lower-case hex digits.")
        folds = [m["fold"] for m in members]
        if len(set(folds)) != len(folds):
            raise CheckpointError(f"Manifest.ensemble.members lists a fold twice: {folds}.")
        if len(self.version) + len(ensemble_suffix(len(members))) > MAX_SERVED_VERSION_LENGTH:
            raise CheckpointError(
                f"Manifest.version {self.version!r} is too long for an ensemble: with "
                f"{ensemble_suffix(len(members))!r} it must fit {MAX_SERVED_VERSION_LENGTH} characters."
            )

    @property
    def member_folds(self) -> list[int]:
        """The folds of an ensemble's members, in manifest order; [] for one network."""
        return [] if self.ensemble is None else [m["fold"] for m in self.ensemble["members"]]

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)

    @property
    def postprocess_config(self) -> PostprocessConfig:
        return PostprocessConfig.from_dict(self.postprocess)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["ensemble"] is None:
            del data["ensemble"]  # single-network manifests stay readable by older ptx-node versions
        return data

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


def member_weights_filename(fold: int) -> str:
    return f"fold_{fold}.safetensors"


def ensemble_suffix(n_members: int) -> str:
    """What an ensemble adds to its version in every output: the number of folds it averages."""
    return f" {n_members}-fold ensemble"


def ensemble_sha256(members: list[dict[str, Any]]) -> str:
    """One digest for a whole ensemble (the node records it as the checkpoint's sha256)."""
    lines = "".join(f"{m['fold']}:{m['weights_sha256']}\n" for m in members)
    return hashlib.sha256(lines.encode("ascii")).hexdigest()


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
    if manifest.ensemble is not None:
        raise CheckpointError("save_checkpoint() writes one network; write an ensemble with save_ensemble().")
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
    return write_manifest(directory, written)


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Replace ``manifest.json`` in ``directory`` atomically (the weights it pins are not
    touched); returns the directory."""
    directory = Path(directory)
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
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
    _, state, manifest = _read_checkpoint(directory)
    return state, manifest


def _read_checkpoint(directory: str | os.PathLike[str]) -> tuple[bytes, dict[str, torch.Tensor], Manifest]:
    """:func:`load_checkpoint`, with the verified bytes of the weights file as well."""
    directory = _checkpoint_dir(directory)
    manifest = read_manifest(directory)
    if manifest.ensemble is not None:
        raise CheckpointError(
            f"Checkpoint {str(directory)!r} is an ensemble of {len(manifest.member_folds)} folds; "
            "load it with load_ensemble() or Segmenter.from_checkpoint()."
        )
    weights_path = directory / WEIGHTS_FILENAME
    weights, state = _read_pinned(
        weights_path, manifest.weights_sha256,
        missing=f"No {WEIGHTS_FILENAME} in checkpoint {str(directory)!r}.",
        subject=f"Checkpoint weights {str(weights_path)!r}",
        mismatch=lambda actual: (
            f"Checkpoint weights {str(weights_path)!r} have sha256 {actual}, but the manifest pins "
            f"{manifest.weights_sha256 or '(none)'}; the file is corrupted or does not belong to this manifest."
        ),
    )
    return weights, state, manifest


def _read_pinned(
    path: Path, expected_sha256: str, *, missing: str, subject: str, mismatch: Callable[[str], str],
) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A weights file's bytes and tensors, refused (CheckpointError with the caller's words)
    when it is missing, does not match its pinned sha256, or does not parse."""
    from safetensors.torch import load

    try:
        weights = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(missing) from None
    actual = hashlib.sha256(weights).hexdigest()
    if actual != expected_sha256:
        raise CheckpointError(mismatch(actual))
    try:
        return weights, load(weights)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{subject} cannot be parsed: {exc}") from exc


def save_ensemble(
    directory: str | os.PathLike[str],
    members: Mapping[int, str | os.PathLike[str]],
    manifest: Manifest,
    *,
    postprocess_tuned_on: str,
) -> Path:
    """Write a fold ensemble of existing single-network checkpoints (``fold -> directory``).

    Each member is read with :func:`load_checkpoint` (its sha256 verified) and must share
    ``SHARED_FIELDS`` with ``manifest``, which supplies everything else (name, version,
    postprocess, metrics, ...). ``postprocess_tuned_on`` says, in words, which images
    ``manifest.postprocess`` was searched on. The manifest passed in is not modified.
    """

    if not isinstance(manifest, Manifest):
        raise TypeError("save_ensemble() needs a Manifest.")
    if manifest.ensemble is not None:
        raise CheckpointError("save_ensemble() builds the ensemble section itself; pass a single-network manifest.")
    if len(members) < 2:
        raise CheckpointError(f"An ensemble needs at least 2 member checkpoints, got {len(members)}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    listed = []
    for fold in sorted(members):
        member_dir = _checkpoint_dir(members[fold])
        # verified and parsed once: a member that cannot be served is refused here, not on the node
        weights, _, member_manifest = _read_checkpoint(member_dir)
        for name in SHARED_FIELDS:
            if getattr(member_manifest, name) != getattr(manifest, name):
                raise CheckpointError(
                    f"Ensemble member fold {fold} ({str(member_dir)!r}) has {name} "
                    f"{getattr(member_manifest, name)!r}, but the ensemble has {getattr(manifest, name)!r}."
                )
        digest = member_manifest.weights_sha256
        _atomic_write_bytes(directory / member_weights_filename(fold), weights)
        listed.append({"fold": int(fold), "weights_file": member_weights_filename(fold), "weights_sha256": digest})
    written = dataclasses.replace(
        manifest,
        ensemble={"combine": "mean_probability", "members": listed, "postprocess_tuned_on": postprocess_tuned_on},
        format_version=ENSEMBLE_FORMAT_VERSION,
        weights_sha256=ensemble_sha256(listed),
        created=manifest.created or datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return write_manifest(directory, written)


def load_ensemble(directory: str | os.PathLike[str]) -> tuple[dict[int, dict[str, torch.Tensor]], Manifest]:
    """Read a fold ensemble (``fold -> weights``), verifying every member's sha256 and the
    manifest's digest of the members' list."""

    directory = _checkpoint_dir(directory)
    manifest = read_manifest(directory)
    if manifest.ensemble is None:
        raise CheckpointError(f"Checkpoint {str(directory)!r} is a single network, not an ensemble.")
    members = manifest.ensemble["members"]
    if ensemble_sha256(members) != manifest.weights_sha256:
        raise CheckpointError(
            f"Ensemble {str(directory)!r}: the manifest's weights_sha256 does not match its list of members; "
            "the manifest was edited or is corrupted."
        )
    states: dict[int, dict[str, torch.Tensor]] = {}
    for member in members:
        fold, path, pinned = member["fold"], directory / member["weights_file"], member["weights_sha256"]
        _, states[fold] = _read_pinned(
            path, pinned,
            missing=f"Ensemble member fold {fold} is missing: no {path.name} in {str(directory)!r}.",
            subject=f"Ensemble member fold {fold} ({str(path)!r})",
            mismatch=lambda actual, fold=fold, path=path, pinned=pinned: (
                f"Ensemble member fold {fold} ({str(path)!r}) has sha256 {actual}, but the manifest pins "
                f"{pinned}; the file is corrupted or belongs to another ensemble."
            ),
        )
    return states, manifest


def load_weights(directory: str | os.PathLike[str]) -> tuple[dict[int | None, dict[str, torch.Tensor]], Manifest]:
    """Every network of a checkpoint of either kind, verified: ``{None: weights}`` for one
    network, ``{fold: weights}`` in manifest order for an ensemble."""
    if read_manifest(directory).ensemble is None:
        state, manifest = load_checkpoint(directory)
        return {None: state}, manifest
    states, manifest = load_ensemble(directory)
    return dict(states), manifest

"""Settings for the objects the node writes (SEG, SR, GSPS, SC), and what the algorithm was."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator, model_validator

__all__ = ["DELIVERY_ORDER", "AlgorithmInfo", "OutputKind", "OutputOptions", "RGBColor"]

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

ColorChannel = Annotated[int, Field(ge=0, le=255)]
RGBColor = tuple[ColorChannel, ColorChannel, ColorChannel]


class OutputKind(StrEnum):
    """An object the node can write for a result, named as the `[outputs]` lists name it."""

    SEG = "seg"  # DICOM Segmentation of the mask
    SR = "sr"  # TID 1500 measurement report (Comprehensive 3D SR)
    GSPS = "gsps"  # Grayscale Softcopy Presentation State: outlines on the original
    SC = "sc"  # secondary-capture overlay (burned-in picture)


#: The order objects are written and delivered: the region first, then what refers to it.
DELIVERY_ORDER: tuple[OutputKind, ...] = (OutputKind.SEG, OutputKind.SR, OutputKind.GSPS, OutputKind.SC)
_REPLACED_KEYS = ("write_seg", "write_sc", "negative_policy")


class OutputOptions(BaseModel, extra="forbid"):
    """The `[outputs]` table of the node configuration."""

    diagnostic_disclaimer: bool = True
    # which objects a positive and a negative result get (any order; sent in DELIVERY_ORDER)
    positive: tuple[OutputKind, ...] = (OutputKind.SEG, OutputKind.SR, OutputKind.GSPS, OutputKind.SC)
    negative: tuple[OutputKind, ...] = (OutputKind.SR, OutputKind.SC)
    fill_opacity: float = Field(default=0.35, ge=0.0, le=1.0)
    # amber outline and fill: visible on both black air and white bone
    outline_color: RGBColor = (255, 214, 0)
    fill_color: RGBColor = (255, 170, 0)
    manufacturer: str = Field(default="ptx-node", min_length=1, max_length=64)
    seg_series_number: int = Field(default=9901, ge=1, le=2**31 - 1)
    sc_series_number: int = Field(default=9902, ge=1, le=2**31 - 1)
    sr_series_number: int = Field(default=9903, ge=1, le=2**31 - 1)
    gsps_series_number: int = Field(default=9904, ge=1, le=2**31 - 1)
    institution_name: str | None = Field(default=None, min_length=1, max_length=64)
    # How source text whose bytes are invalid for its declared (or default) character set
    # is read before the outputs re-encode it as UTF-8 (node.outputs.sanitize): a DICOM
    # term (ISO_IR 100, ISO_IR 144, ...) or a codec name (cp1251, koi8_r). Valid UTF-8
    # is always read as UTF-8 first.
    fallback_character_set: str = "ISO_IR 100"

    @field_validator("fallback_character_set")
    @classmethod
    def _known_character_set(cls, value: str) -> str:
        from node.outputs.sanitize import check_character_set_name

        return check_character_set_name(value)

    @model_validator(mode="before")
    @classmethod
    def _refuse_replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = [key for key in _REPLACED_KEYS if key in data]
            if old:
                raise ValueError(
                    f"{', '.join(old)} {'is' if len(old) == 1 else 'are'} no longer read: say which objects "
                    'a result gets with positive = ["seg", "sr", "gsps", "sc"] and negative = ["sr", "sc"] '
                    "(the defaults; drop an object from a list to stop writing it)"
                )
        return data

    @field_validator("positive", "negative")
    @classmethod
    def _no_repeats(cls, kinds: tuple[OutputKind, ...]) -> tuple[OutputKind, ...]:
        if len(set(kinds)) != len(kinds):
            raise ValueError("each object may be listed once")
        return kinds

    @model_validator(mode="after")
    def _series_numbers_differ(self) -> OutputOptions:
        numbers = [self.seg_series_number, self.sr_series_number, self.gsps_series_number, self.sc_series_number]
        if len(set(numbers)) != len(numbers):
            raise ValueError("seg_series_number, sr_series_number, gsps_series_number and sc_series_number must differ.")
        return self


@dataclass(frozen=True)
class AlgorithmInfo:
    """The model that produced a mask, as recorded in every output."""

    name: str
    version: str
    checkpoint_sha256: str | None
    untrained: bool
    #: The model's own warning for every output (checkpoint manifest "caveat", e.g. a demo model).
    caveat: str | None = None

    def __post_init__(self) -> None:
        if self.caveat is not None and (not isinstance(self.caveat, str) or not 0 < len(self.caveat) <= 64):
            raise ValueError("Algorithm caveat must be a string of 1 to 64 characters.")
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("Algorithm name must be a non-empty string.")
        if not isinstance(self.version, str) or not self.version.strip():
            raise ValueError("Algorithm version must be a non-empty string.")
        if self.untrained and self.checkpoint_sha256 is not None:
            raise ValueError("An untrained algorithm has no checkpoint_sha256.")
        if not self.untrained:
            if self.checkpoint_sha256 is None:
                raise ValueError("A trained algorithm needs its checkpoint_sha256.")
            if not _SHA256_HEX.match(self.checkpoint_sha256):
                raise ValueError("checkpoint_sha256 must be 64 lower-case hex digits.")

    @classmethod
    def from_segmenter(cls, segmenter: Any) -> AlgorithmInfo:
        """Read name, version, checkpoint hash and untrained flag off a `model.Segmenter`."""
        return cls(
            name=str(segmenter.name),
            version=str(segmenter.version),
            checkpoint_sha256=segmenter.checkpoint_sha256,
            untrained=bool(segmenter.untrained),
            caveat=getattr(segmenter, "caveat", None) or None,
        )

    @property
    def short_hash(self) -> str | None:
        return None if self.checkpoint_sha256 is None else self.checkpoint_sha256[:12]

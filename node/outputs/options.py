"""Settings for the SEG and SC objects the node writes, and what the algorithm was."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, Field, model_validator

__all__ = ["AlgorithmInfo", "NegativePolicy", "OutputOptions", "RGBColor"]

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

ColorChannel = Annotated[int, Field(ge=0, le=255)]
RGBColor = tuple[ColorChannel, ColorChannel, ColorChannel]


class NegativePolicy(StrEnum):
    """Which objects to write when the model finds no pneumothorax."""

    SC_ONLY = "sc_only"  # overlay saying "No pneumothorax detected", no SEG
    SEG_AND_SC = "seg_and_sc"  # an empty SEG frame plus the overlay
    NONE = "none"  # nothing at all


class OutputOptions(BaseModel, extra="forbid"):
    """The `[outputs]` table of the node configuration."""

    diagnostic_disclaimer: bool = True
    negative_policy: NegativePolicy = NegativePolicy.SC_ONLY
    write_seg: bool = True
    write_sc: bool = True
    fill_opacity: float = Field(default=0.35, ge=0.0, le=1.0)
    # amber outline and fill: visible on both black air and white bone
    outline_color: RGBColor = (255, 214, 0)
    fill_color: RGBColor = (255, 170, 0)
    manufacturer: str = Field(default="ptx-node", min_length=1, max_length=64)
    seg_series_number: int = Field(default=9901, ge=1, le=2**31 - 1)
    sc_series_number: int = Field(default=9902, ge=1, le=2**31 - 1)
    institution_name: str | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _series_numbers_differ(self) -> OutputOptions:
        if self.seg_series_number == self.sc_series_number:
            raise ValueError("seg_series_number and sc_series_number must differ.")
        return self


@dataclass(frozen=True)
class AlgorithmInfo:
    """The model that produced a mask, as recorded in every output."""

    name: str
    version: str
    checkpoint_sha256: str | None
    untrained: bool

    def __post_init__(self) -> None:
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
        )

    @property
    def short_hash(self) -> str | None:
        return None if self.checkpoint_sha256 is None else self.checkpoint_sha256[:12]

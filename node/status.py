"""The one place that knows DICOM C-STORE status codes."""

from __future__ import annotations

import enum

__all__ = ["StoreStatus", "describe_status", "is_refusal", "is_success"]


class StoreStatus(enum.IntEnum):
    SUCCESS = 0x0000
    # Warnings: stored, with a remark.
    COERCION_OF_DATA_ELEMENTS = 0xB000
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    ELEMENTS_DISCARDED = 0xB006
    # Failures.
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    CANNOT_DECODE = 0xC210
    CANNOT_STORE = 0xC211  # node-specific: spool or database write failed
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    PROCESSING_FAILURE = 0x0110


def is_success(code: int) -> bool:
    """Success and warnings both mean the peer stored the instance."""
    return code == StoreStatus.SUCCESS or (code & 0xF000) == 0xB000


def is_refusal(code: int) -> bool:
    """The peer will never store this object (SOP class not supported, data set does not
    match the SOP class): retrying cannot help."""
    return code == StoreStatus.SOP_CLASS_NOT_SUPPORTED or (code & 0xFF00) == 0xA900


def describe_status(code: int) -> str:
    try:
        name = StoreStatus(code).name.replace("_", " ").lower()
    except ValueError:
        name = "warning" if (code & 0xF000) == 0xB000 else "failure"
    return f"0x{code:04X} ({name})"

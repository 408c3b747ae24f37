"""Why a job was SKIPPED or FAILED: a stable code plus a sentence for people.

The code (``jobs.reason_code``) is what scripts and dashboards group by; the sentence
(``jobs.error``) is what an admin reads. A sentence may carry numbers ("image 211x169
is smaller than 256 px") and DICOM code strings from a defined set (a modality such as
CT), never a Python exception text or free text from a header: tracebacks go to the log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "JobReason",
    "ReasonCode",
    "RefusedInstance",
    "code_value",
    "exception_text_in",
    "first_line",
    "format_reason",
]


class ReasonCode(StrEnum):
    """The documented set of reason codes (README, "Job reasons")."""

    SELECTION = "selection"  # not a frontal chest CR/DX (modality, body part, view, own output)
    UNSUPPORTED_IMAGE = "unsupported-image"  # colour, multi-frame, no photometric interpretation
    IMAGE_TOO_SMALL = "image-too-small"  # below scp.min_image_size
    IMAGE_TOO_LARGE = "image-too-large"  # would decode to more than scp.max_decoded_bytes
    NO_PIXEL_DATA = "no-pixel-data"
    PIXEL_DATA_SHORT = "pixel-data-short"  # fewer bytes than Rows x Columns x bits say
    UNDECODABLE = "undecodable"  # the pixel data cannot be decoded
    BAD_PIXEL_MODULE = "bad-pixel-module"  # Rows, Columns, bits missing or impossible
    MISSING_UID = "missing-uid"  # Study, Series or SOP Instance UID missing or invalid
    SPOOL_MISSING = "spool-missing"  # the spooled file is gone
    MODEL_UNAVAILABLE = "model-unavailable"  # no checkpoint, or it failed verification
    WORKER_LOST = "worker-lost"  # the worker died on this image max_attempts times
    DELIVERY_FAILED = "delivery-failed"  # a destination refused or stayed down
    INTERNAL = "internal"  # a bug: details in the worker log under the job id


@dataclass(frozen=True)
class JobReason:
    code: ReasonCode
    sentence: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.sentence}"


class RefusedInstance(ValueError):
    """An instance the node will not process, with the reason to record on its job."""

    def __init__(self, reason: JobReason) -> None:
        super().__init__(reason.sentence)
        self.reason = reason


_CODE_STRING = re.compile(r"^[A-Z0-9_ ]{1,16}$")


def code_value(value: object) -> str | None:
    """A header value fit to quote in a reason: a DICOM code string (CS), else None."""
    text = str(value or "").strip().upper()
    return text if _CODE_STRING.match(text) else None


# "ValueError", "KeyError: ...", "Traceback (most recent call last)", "File "x.py", line 3"
_EXCEPTION_TEXT = re.compile(
    r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+"
    r"|\b[A-Z][A-Za-z]*(Error|Exception|Warning|Interrupt|Exit)\b|\bStopIteration\b"
)


def exception_text_in(text: str | None) -> str | None:
    """The part of `text` that looks like a Python exception or traceback, or None."""
    if not text:
        return None
    match = _EXCEPTION_TEXT.search(text)
    return match.group(0) if match else None


def first_line(exc: BaseException) -> str:
    """One line of an exception for a log line or a start-up message (never a job's reason):
    the driver's own message for a SQLAlchemy error, else the first line, else the type."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def format_reason(code: str | None, sentence: str | None) -> str:
    """What the CLI and the status page show: "[code] sentence" ("" when there is none)."""
    if not sentence:
        return f"[{code}]" if code else ""
    return f"[{code}] {sentence}" if code else sentence

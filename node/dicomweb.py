"""DICOMweb STOW-RS: the client that delivers outputs to a STOW-RS destination, and
the multipart/related codec and status vocabulary shared with the node's own
STOW-RS intake (``node.http``).

``stow_store(destination, paths)`` sends the files in one request and returns how
many the origin server stored; any failure (transport, HTTP status, or an
instance listed in the response's FailedSOPSequence) raises ``StowError`` with
the reason, so the caller's retry policy applies exactly as for C-STORE.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import secrets
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from node.config import Destination
from node.status import is_refusal

__all__ = [
    "DICOM_JSON",
    "DICOM_XML",
    "FailureReason",
    "MultipartError",
    "MultipartLimitError",
    "MultipartRelatedReader",
    "ReceivedPart",
    "StowError",
    "StowOutcome",
    "multipart_content_type",
    "parse_content_type",
    "parse_stow_response",
    "stow_store",
]

log = logging.getLogger(__name__)

# Standard phrases (RFC 9110), not the server's reason phrase: that one is free text.
_STATUS_WORDS = {
    400: "bad request", 404: "not found (check the destination's URL)", 405: "method not allowed",
    406: "not acceptable", 408: "request timeout", 409: "conflict", 413: "content too large",
    415: "unsupported media type", 429: "too many requests", 500: "internal server error",
    502: "bad gateway", 503: "service unavailable", 504: "gateway timeout",
}

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
_CHUNK = 1 << 20

# STOW-RS response attributes (PS3.18 10.5.3).
TAG_RETRIEVE_URL = "00081190"
TAG_FAILED_SOP_SEQUENCE = "00081198"
TAG_REFERENCED_SOP_SEQUENCE = "00081199"
TAG_REFERENCED_SOP_CLASS_UID = "00081150"
TAG_REFERENCED_SOP_INSTANCE_UID = "00081155"
TAG_FAILURE_REASON = "00081197"
TAG_WARNING_REASON = "00081196"


class FailureReason(enum.IntEnum):
    """FailureReason (0008,1197) values a STOW-RS origin server returns per instance."""

    PROCESSING_FAILURE = 0x0110
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH = 0xA900  # also used for a Study Instance UID other than the URL's
    CANNOT_UNDERSTAND = 0xC000
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

    @property
    def description(self) -> str:
        return _FAILURE_TEXT[self]


_FAILURE_TEXT = {
    FailureReason.PROCESSING_FAILURE: "processing failure",
    FailureReason.SOP_CLASS_NOT_SUPPORTED: "SOP class not supported",
    FailureReason.OUT_OF_RESOURCES: "out of resources",
    FailureReason.DATA_SET_DOES_NOT_MATCH: "data set does not match",
    FailureReason.CANNOT_UNDERSTAND: "cannot understand",
    FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED: "transfer syntax not supported",
}


def describe_failure_reason(code: int) -> str:
    try:
        return f"0x{code:04X} {FailureReason(code).description}"
    except ValueError:
        return f"0x{code:04X}"


class StowError(Exception):
    """A STOW-RS request did not store every instance; the message says why.

    ``permanent``: the origin server will never store them (SOP class not supported,
    data set does not match, media type refused), so retrying cannot help.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class MultipartError(ValueError):
    """A multipart/related body that cannot be split into parts."""


# ---------------------------------------------------------------------------
# multipart/related codec


def multipart_content_type(boundary: str, part_type: str = "application/dicom") -> str:
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type header into its media type and lower-cased parameters.

    python-multipart's parser: linear in the header's length (a hand-written regex here
    once took seconds on a 24 KB value and froze the whole process).
    """
    media, params = parse_options_header(value)
    return media.decode("latin-1").strip(), {
        k.decode("latin-1").strip().lower(): v.decode("latin-1") for k, v in params.items()
    }


class MultipartLimitError(MultipartError):
    """A multipart body over one of the configured bounds (HTTP 413)."""


@dataclass
class ReceivedPart:
    """One body part: its headers (lower-cased names), where its bytes went, their size."""

    index: int
    headers: dict[str, str]
    path: Path
    size: int = 0

    @property
    def content_type(self) -> tuple[str, dict[str, str]]:
        return parse_content_type(self.headers.get("content-type", ""))


class MultipartRelatedReader:
    """Streams a multipart/related body, each part's bytes straight into its own file.

    Feed the body with ``write(chunk)`` as it arrives, then ``finish()``. python-multipart's
    streaming parser does the splitting; this class adds the bounds (parts, bytes per
    part, header lines and their length) and raises ``MultipartLimitError`` the moment one
    is passed, ``MultipartError`` on a malformed body, before reading any further.
    """

    def __init__(self, content_type: str, part_dir: Path, *, max_parts: int, max_part_bytes: int,
                 max_header_bytes: int, max_header_lines: int = 16) -> None:
        media, params = parse_content_type(content_type)
        if media != "multipart/related":
            raise MultipartError(f"Content-Type {media or 'missing'} is not multipart/related")
        boundary = params.get("boundary", "")
        # RFC 2046 allows 70 characters; Orthanc sends 73, so python-multipart's own bound applies.
        if not boundary or len(boundary) > 256:
            raise MultipartError("multipart/related Content-Type has no valid boundary parameter")
        self.root_type = params.get("type", "").strip().lower()
        self.parts: list[ReceivedPart] = []
        self._part_dir = part_dir
        self._max_parts = max_parts
        self._max_part_bytes = max_part_bytes
        self._max_header_bytes = max_header_bytes
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}
        self._file: Any = None
        self._ended = False
        self._parser = MultipartParser(
            boundary.encode("latin-1"),
            callbacks={
                "on_part_begin": self._part_begin,
                "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
                "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
            max_header_count=max_header_lines,
            max_header_size=max_header_bytes,
        )

    def write(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            message = str(exc)
            if "header size" in message:
                raise MultipartLimitError(f"a part header line is longer than {self._max_header_bytes} bytes") from None
            if "header count" in message:
                raise MultipartLimitError("a part has too many header lines") from None
            raise MultipartError(f"malformed multipart/related body ({message.rstrip('.')})") from None

    def finish(self) -> list[ReceivedPart]:
        self._parser.finalize()
        if not self._ended:
            raise MultipartError("multipart body ends before its closing boundary")
        return self.parts

    def close(self) -> None:
        """Remove every part file (call once the parts are taken)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for part in self.parts:
            part.path.unlink(missing_ok=True)

    # parser callbacks
    def _part_begin(self) -> None:
        if len(self.parts) >= self._max_parts:
            raise MultipartLimitError(f"more than {self._max_parts} parts in one request")
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        fd, name = tempfile.mkstemp(dir=self._part_dir, prefix=".stow-", suffix=".part")
        self.parts.append(ReceivedPart(len(self.parts), self._headers, Path(name)))
        self._file = os.fdopen(fd, "wb")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        part.size += end - start
        if part.size > self._max_part_bytes:
            raise MultipartLimitError(f"part {part.index + 1} is larger than {self._max_part_bytes} bytes")
        self._file.write(memoryview(data)[start:end])

    def _part_end(self) -> None:
        if self._file is not None:  # a part without a header block never opened one
            self._file.close()
            self._file = None

    def _end(self) -> None:
        self._ended = True


def _multipart_stream(paths: list[Path], boundary: str) -> tuple[Iterator[bytes], int]:
    """The request body as a stream of chunks read from disk, and its exact length."""
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
    tail = f"\r\n--{boundary}--\r\n".encode("ascii")
    separator = b"\r\n" + head
    sizes = [p.stat().st_size for p in paths]
    length = len(head) + sum(sizes) + len(separator) * (len(paths) - 1) + len(tail)

    def chunks() -> Iterator[bytes]:
        for index, path in enumerate(paths):
            yield head if index == 0 else separator
            with open(path, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    yield chunk
        yield tail

    return chunks(), length


# ---------------------------------------------------------------------------
# STOW-RS response


@dataclass
class StowOutcome:
    """What an origin server said about each instance of one STOW-RS request."""

    stored: list[str] = field(default_factory=list)  # SOP Instance UIDs
    failed: list[tuple[str | None, int | None]] = field(default_factory=list)  # (UID, reason)
    warnings: list[tuple[str | None, int]] = field(default_factory=list)

    def failure_text(self) -> str:
        return "; ".join(
            f"{uid or 'unknown instance'}: {describe_failure_reason(code) if code is not None else 'no reason given'}"
            for uid, code in self.failed
        )


def _json_values(item: dict, tag: str) -> list:
    element = item.get(tag) or item.get(tag.upper()) or {}
    return list(element.get("Value") or [])


def _parse_json_response(payload: object) -> StowOutcome:
    if isinstance(payload, list):  # some servers wrap the dataset in an array
        payload = payload[0] if payload else {}
    if not isinstance(payload, dict):
        raise ValueError("STOW-RS JSON response is not a DICOM JSON dataset")
    outcome = StowOutcome()
    for item in _json_values(payload, TAG_REFERENCED_SOP_SEQUENCE):
        uids = _json_values(item, TAG_REFERENCED_SOP_INSTANCE_UID)
        uid = str(uids[0]) if uids else None
        if uid:
            outcome.stored.append(uid)
        for code in _json_values(item, TAG_WARNING_REASON):
            outcome.warnings.append((uid, int(code)))
    for item in _json_values(payload, TAG_FAILED_SOP_SEQUENCE):
        uids = _json_values(item, TAG_REFERENCED_SOP_INSTANCE_UID)
        codes = _json_values(item, TAG_FAILURE_REASON)
        outcome.failed.append((str(uids[0]) if uids else None, int(codes[0]) if codes else None))
    return outcome


def _parse_xml_response(text: str) -> StowOutcome:
    root = ET.fromstring(text)

    def attribute(node: ET.Element, tag: str) -> ET.Element | None:
        for child in node:
            if child.tag.endswith("DicomAttribute") and child.get("tag", "").upper() == tag:
                return child
        return None

    def first_value(node: ET.Element, tag: str) -> str | None:
        attr = attribute(node, tag)
        if attr is None:
            return None
        for value in attr:
            if value.tag.endswith("Value") and value.text:
                return value.text.strip()
        return None

    def items(tag: str) -> list[ET.Element]:
        seq = attribute(root, tag)
        return [] if seq is None else [i for i in seq if i.tag.endswith("Item")]

    outcome = StowOutcome()
    for item in items(TAG_REFERENCED_SOP_SEQUENCE):
        uid = first_value(item, TAG_REFERENCED_SOP_INSTANCE_UID)
        if uid:
            outcome.stored.append(uid)
        warning = first_value(item, TAG_WARNING_REASON)
        if warning is not None:
            outcome.warnings.append((uid, int(warning)))
    for item in items(TAG_FAILED_SOP_SEQUENCE):
        code = first_value(item, TAG_FAILURE_REASON)
        outcome.failed.append(
            (first_value(item, TAG_REFERENCED_SOP_INSTANCE_UID), int(code) if code is not None else None)
        )
    return outcome


def parse_stow_response(content_type: str, body: bytes) -> StowOutcome | None:
    """The per-instance outcome from a STOW-RS response body; None when it has none."""
    if not body.strip():
        return None
    media = parse_content_type(content_type)[0]
    text = body.decode("utf-8", "replace")
    if media in (DICOM_XML, "application/xml", "text/xml") or text.lstrip().startswith("<"):
        return _parse_xml_response(text)
    if media in (DICOM_JSON, "application/json") or text.lstrip()[:1] in "[{":
        return _parse_json_response(json.loads(text))
    return None


# ---------------------------------------------------------------------------
# client


def _auth_headers(dest: Destination) -> dict[str, str]:
    if dest.token:
        return {"Authorization": f"Bearer {dest.token}"}
    return {}


def stow_store(dest: Destination, paths: list[Path] | list[str | os.PathLike[str]]) -> int:
    """POST ``paths`` to ``{dest.url}/studies`` in one STOW-RS request; return how many were stored.

    Raises ``StowError`` unless the origin server stored every instance.
    """
    if dest.kind != "stow":
        raise ValueError(f"destination {dest.name!r} is a {dest.kind} destination, not stow")
    files = [Path(p) for p in paths]
    if not files:
        raise ValueError("stow_store needs at least one file")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ValueError(f"files to send do not exist: {', '.join(missing)}")
    url = f"{(dest.url or '').rstrip('/')}/studies"
    boundary = f"ptx-node-{secrets.token_hex(16)}"
    body, length = _multipart_stream(files, boundary)
    headers = {
        "Content-Type": multipart_content_type(boundary),
        # An explicit length: some origin servers refuse chunked uploads.
        "Content-Length": str(length),
        "Accept": DICOM_JSON,
        **_auth_headers(dest),
    }
    auth = None
    if not dest.token and dest.username:
        auth = httpx.BasicAuth(dest.username, dest.password or "")
    try:
        response = httpx.post(url, content=body, headers=headers, auth=auth, timeout=dest.timeout_s)
    except httpx.HTTPError as exc:
        # words, not the exception's class and text: this becomes a job's reason (node.reasons)
        if isinstance(exc, httpx.TimeoutException):
            what = "timed out"
        elif isinstance(exc, httpx.ConnectError):
            what = "could not connect (refused or unreachable)"
        else:
            what = "the HTTP exchange broke off"
        log.info("STOW-RS to %s: %s", dest.name, what, exc_info=True)
        raise StowError(f"STOW-RS to {dest.name} ({url}) failed: {what}") from exc

    status = response.status_code
    try:
        outcome = parse_stow_response(response.headers.get("content-type", ""), response.content)
    except (ValueError, ET.ParseError) as exc:
        if 200 <= status < 300:
            # The parser's text can quote the response; the reason stays words (the log has the rest).
            log.info("STOW-RS to %s: unreadable response: %s", dest.name, exc)
            raise StowError(f"STOW-RS to {dest.name}: HTTP {status} with a response body that is not DICOM JSON or XML") from exc
        outcome = None
    if status in (401, 403):
        raise StowError(f"STOW-RS to {dest.name}: HTTP {status}: not authorized (check username/password or token)")
    if outcome is not None and outcome.failed:
        refused = all(code is not None and is_refusal(code) for _uid, code in outcome.failed)
        raise StowError(
            f"STOW-RS to {dest.name}: HTTP {status}: {len(outcome.failed)} of {len(files)} instance(s) failed: "
            f"{outcome.failure_text()}",
            permanent=refused,
        )
    if not 200 <= status < 300:
        # The body is the server's own (an HTML page, a Java stack trace): the log keeps it, the
        # reason a job records stays the status and its standard phrase.
        log.info("STOW-RS to %s: HTTP %s: %s", dest.name, status, response.text.strip()[:2000])
        phrase = _STATUS_WORDS.get(status) or f"refused (HTTP status {status})"
        raise StowError(f"STOW-RS to {dest.name}: HTTP {status}: {phrase}; the server's answer is in the node's log",
                        permanent=status == 415)
    if status == 202 and outcome is None:
        raise StowError(f"STOW-RS to {dest.name}: HTTP 202 (stored only some instances) without a response body")
    if outcome is None or not outcome.stored:
        # A 200 without a per-instance list means the origin server stored all of them.
        return len(files)
    if len(outcome.stored) < len(files):
        raise StowError(
            f"STOW-RS to {dest.name}: HTTP {status} but only {len(outcome.stored)} of {len(files)} instance(s) "
            "listed as stored"
        )
    return len(outcome.stored)

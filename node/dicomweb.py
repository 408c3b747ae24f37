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
import mmap
import os
import re
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from node.config import Destination

__all__ = [
    "DICOM_JSON",
    "DICOM_XML",
    "FailureReason",
    "MultipartError",
    "StowError",
    "StowOutcome",
    "multipart_content_type",
    "parse_multipart_related",
    "parse_stow_response",
    "stow_store",
]

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
    """A STOW-RS request did not store every instance; the message says why."""


class MultipartError(ValueError):
    """A multipart/related body that cannot be split into parts."""


# ---------------------------------------------------------------------------
# multipart/related codec


def multipart_content_type(boundary: str, part_type: str = "application/dicom") -> str:
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def _parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type header into its media type and lower-cased parameters."""
    media, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for match in re.finditer(r'\s*([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)\s*;?', rest):
        key, raw = match.group(1).lower(), match.group(2).strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = raw[1:-1].replace('\\"', '"')
        params[key] = raw
    return media.strip().lower(), params


@dataclass(frozen=True)
class Part:
    """One body part: its headers (lower-cased names) and its byte range in the body."""

    headers: dict[str, str]
    start: int
    end: int

    @property
    def content_type(self) -> str:
        return _parse_content_type(self.headers.get("content-type", ""))[0]


def parse_multipart_related(body: bytes | bytearray | mmap.mmap, content_type: str) -> tuple[str, list[Part]]:
    """Split a multipart/related body; returns (root type parameter, parts).

    Parts are byte ranges into ``body`` (bytes or an mmap of a spooled upload), so
    large uploads are never copied whole. Raises ``MultipartError`` on a malformed body or header.
    """
    media, params = _parse_content_type(content_type)
    if media != "multipart/related":
        raise MultipartError(f"Content-Type {media or 'missing'} is not multipart/related")
    boundary = params.get("boundary")
    if not boundary or len(boundary) > 200:
        raise MultipartError("multipart/related Content-Type has no valid boundary parameter")
    data = body
    delimiter = b"--" + boundary.encode("latin-1")
    first = data.find(delimiter)
    if first < 0:
        raise MultipartError("multipart body holds no boundary delimiter")
    parts: list[Part] = []
    position = first + len(delimiter)
    while True:
        if data[position : position + 2] == b"--":
            break  # close delimiter
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            raise MultipartError("multipart body ends inside a boundary line")
        header_end = data.find(b"\r\n\r\n", line_end)
        if header_end < 0:
            raise MultipartError("multipart part has no end of headers")
        headers: dict[str, str] = {}
        for raw_line in bytes(data[line_end + 2 : header_end]).split(b"\r\n"):
            if not raw_line.strip():
                continue
            name, sep, value = raw_line.decode("latin-1").partition(":")
            if not sep:
                raise MultipartError(f"malformed part header line {raw_line[:60]!r}")
            headers[name.strip().lower()] = value.strip()
        start = header_end + 4
        next_delimiter = data.find(b"\r\n" + delimiter, start)
        if next_delimiter < 0:
            raise MultipartError("multipart body has no closing boundary")
        parts.append(Part(headers, start, next_delimiter))
        position = next_delimiter + 2 + len(delimiter)
    return params.get("type", ""), parts


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
    media = _parse_content_type(content_type)[0]
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
        raise StowError(f"STOW-RS to {dest.name} ({url}) failed: {type(exc).__name__}: {exc}") from exc

    status = response.status_code
    try:
        outcome = parse_stow_response(response.headers.get("content-type", ""), response.content)
    except (ValueError, ET.ParseError) as exc:
        if 200 <= status < 300:
            raise StowError(f"STOW-RS to {dest.name}: HTTP {status} with an unreadable response: {exc}") from exc
        outcome = None
    if status in (401, 403):
        raise StowError(f"STOW-RS to {dest.name}: HTTP {status}: not authorized (check username/password or token)")
    if outcome is not None and outcome.failed:
        raise StowError(
            f"STOW-RS to {dest.name}: HTTP {status}: {len(outcome.failed)} of {len(files)} instance(s) failed: "
            f"{outcome.failure_text()}"
        )
    if not 200 <= status < 300:
        detail = response.text.strip().replace("\n", " ")[:300]
        raise StowError(f"STOW-RS to {dest.name}: HTTP {status} {response.reason_phrase}{': ' + detail if detail else ''}")
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

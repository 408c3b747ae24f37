"""A generated corpus of malformed and hostile inputs, sent to a running node (`ptx-node
serve`, untrained model, embedded worker) by C-STORE (pynetdicom, the file's bytes sent
as they are) and by STOW-RS. The node stays up, every input gets a DIMSE status or HTTP
answer and, where stored, a job row that ends with a reason; nothing is written outside
the spool; a good image sent after all of them ends DONE."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from node.db import TERMINAL_STATUSES, JobStatus
from node.demo.pacs import free_port
from tests.outputs_helpers import dciodvfy_errors
from tests.services import NodeProcess, base_node_config, make_phantom

pytestmark = [pytest.mark.services]

TOKEN = "hostile-corpus-token-31d"
DIMSE_SUCCESS = 0x0000


def phantom(folder: Path, size: int = 512) -> Dataset:
    return pydicom.dcmread(make_phantom(folder / f"phantom-{generate_uid()}.dcm", seed=7, size=size))


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def nested_sequence(depth: int) -> bytes:
    """ContentSequence items nested ``depth`` deep, undefined lengths, explicit VR little endian
    (encoded by hand: building it with pydicom takes minutes)."""
    open_level = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close_level = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return open_level * depth + close_level * depth


# Each mutation turns a copy of a valid 512 px CR into one hostile input (a data set, or raw file bytes).
Mutation = Callable[[Dataset, Path], Dataset | bytes]


def _set(**values: object) -> Mutation:
    def mutate(ds: Dataset, canary: Path) -> Dataset:
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        return ds
    return mutate


def _traversal_uid(ds: Dataset, canary: Path) -> Dataset:
    # From spool/incoming to the canary folder next to the spool; short enough (64) to be sent.
    ds.SOPInstanceUID = f"../../{canary.name}/escaped.dcm"
    return ds


def _traversal_study(ds: Dataset, canary: Path) -> Dataset:
    ds.StudyInstanceUID = ds.SeriesInstanceUID = f"..{os.sep}..{os.sep}..{canary}"
    return ds


def _pixels(factor: float) -> Mutation:
    def mutate(ds: Dataset, canary: Path) -> Dataset:
        ds.PixelData = ds.PixelData[: int(len(ds.PixelData) * factor) // 2 * 2] if factor < 1 else ds.PixelData * 2
        return ds
    return mutate


def _truncated(fraction: float) -> Mutation:
    def mutate(ds: Dataset, canary: Path) -> bytes:
        data = to_bytes(ds)
        return data[: int(len(data) * fraction)]
    return mutate


def _drop(*keywords: str) -> Mutation:
    def mutate(ds: Dataset, canary: Path) -> Dataset:
        for keyword in keywords:
            delattr(ds, keyword)
        return ds
    return mutate


def _rgb_on_gray(ds: Dataset, canary: Path) -> Dataset:
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
    return ds


def _rgb_claim_one_sample(ds: Dataset, canary: Path) -> Dataset:
    ds.PhotometricInterpretation = "RGB"
    return ds


def _deep_nesting(ds: Dataset, canary: Path) -> bytes:
    data = to_bytes(ds)
    pixel_data = data.rfind(b"\xe0\x7f\x10\x00")  # ContentSequence (0040,A730) sorts just before it
    return data[:pixel_data] + nested_sequence(5000) + data[pixel_data:]


def _huge_text(ds: Dataset, canary: Path) -> Dataset:
    ds.ImageComments = "A" * (8 << 20)
    return ds


def _many_elements(ds: Dataset, canary: Path) -> Dataset:
    block = ds.private_block(0x0099, "PTX HOSTILE", create=True)
    for offset in range(0xFF):
        block.add_new(offset, "LO", f"value {offset}")
    ds.add_new(0x00990020, "UN", b"\xff" * 4096)
    return ds


def _jpeg_claim_native_pixels(ds: Dataset, canary: Path) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    data = to_bytes(ds)
    data_set_at = 132 + 12 + int.from_bytes(data[140:144], "little")  # after (0002,0000) and its group
    meta = DicomBytesIO()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless  # pydicom itself will not write this lie
    write_file_meta_info(meta, ds.file_meta)
    return data[:132] + meta.getvalue() + data[data_set_at:]


def _garbage_fragments(ds: Dataset, canary: Path) -> Dataset:
    from pydicom.encaps import encapsulate

    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([os.urandom(5000)])
    ds["PixelData"].VR = "OB"
    return ds


def _broken_value_bytes(ds: Dataset, canary: Path) -> bytes:
    data = bytearray(to_bytes(ds))
    tag = b"\x28\x00\x10\x00US\x02\x00"  # Rows, explicit VR little endian
    at = data.find(tag)
    data[at + 6:at + 8] = b"\x03\x00"  # a 3-byte US value: every later element shifts
    return bytes(data)


def _unknown_charset(ds: Dataset, canary: Path) -> Dataset:
    ds.SpecificCharacterSet = "ISO_IR 999"
    ds.PatientName = "Dup\xe9ont^\xc9lise"
    return ds


CORPUS: dict[str, Mutation] = {
    "sop_uid_path_traversal": _traversal_uid,
    "study_uid_path_traversal": _traversal_study,
    "sop_uid_sql": _set(SOPInstanceUID="1.2.3'); DROP TABLE jobs; --"),
    "study_uid_sql": _set(StudyInstanceUID="1' OR '1'='1"),
    "sop_uid_forges_a_log_line": _set(SOPInstanceUID="1.2.3\r\nFORGED 2026-12-01 INFO ptx-node job 1: DONE\x1b[2K"),
    "html_in_text": _set(SeriesDescription="<script>alert(1)</script>", Manufacturer="<img src=x onerror=alert(1)>"),
    "truncated_in_header": _truncated(0.0005),
    "truncated_in_pixels": _truncated(0.6),
    "pixels_shorter_than_header": _pixels(0.5),
    "pixels_longer_than_header": _pixels(2),
    "claims_60000x60000": _set(Rows=60000, Columns=60000),
    "zero_rows": _set(Rows=0),
    "zero_columns": _set(Columns=0),
    "rgb_claim_on_gray_pixels": _rgb_on_gray,
    "rgb_claim_one_sample": _rgb_claim_one_sample,
    "window_width_zero": _set(WindowCenter="2048", WindowWidth="0"),
    "window_not_numbers": _set(WindowCenter="2048", WindowWidth="-1\\1e999"),
    "rescale_slope_zero": _set(RescaleSlope="0", RescaleIntercept="0"),
    "bits_stored_over_allocated": _set(BitsStored=24, HighBit=23),
    "bits_allocated_odd": _set(BitsAllocated=12),
    "frames_claimed_1000": _set(NumberOfFrames=1000),
    "frames_zero": _set(NumberOfFrames=0),
    "deep_sequence_nesting": _deep_nesting,
    "huge_text_value": _huge_text,
    "many_private_elements": _many_elements,
    "no_pixel_data": _drop("PixelData"),
    "no_sop_instance_uid": _drop("SOPInstanceUID"),
    "jpeg2000_claim_native_pixels": _jpeg_claim_native_pixels,
    "jpeg2000_garbage_fragments": _garbage_fragments,
    "broken_value_length": _broken_value_bytes,
    "unknown_character_set": _unknown_charset,
}


@contextlib.contextmanager
def raw_file_sending() -> Iterator[None]:
    """pynetdicom sends the file's bytes after its File Meta as they are (no decode, no re-encode)."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def c_store(node: NodeProcess, path: Path) -> int | str:
    """The C-STORE status, or why the sender could not send it."""
    ae = AE(ae_title="HOSTILE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for syntax in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", JPEG2000Lossless):
        ae.add_requested_context(ComputedRadiographyImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established, "the node refused an association"
    try:
        with raw_file_sending():
            answer = assoc.send_c_store(path)
    except (AttributeError, ValueError) as exc:  # the sender refuses before sending
        return f"not sent: {type(exc).__name__}"
    finally:
        assoc.release()
    assert "Status" in answer, f"no C-STORE answer for {path.name} (association aborted?)"
    return int(answer.Status)


def stow(http_url: str, parts: list[bytes]) -> httpx.Response:
    boundary = "h0stile"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    body += f"--{boundary}--\r\n".encode()
    return httpx.post(http_url + "/dicom-web/studies", content=body, timeout=120,
                      headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                               "Authorization": f"Bearer {TOKEN}"})


def million_tiny_parts(boundary: str) -> Iterator[bytes]:
    part = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\nx\r\n".encode()
    for _ in range(1000):
        yield part * 1000
    yield f"--{boundary}--\r\n".encode()


def files_outside(root: Path, spool: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and spool not in p.parents}


def test_hostile_corpus_by_c_store_and_stow(tmp_path: Path) -> None:
    assert len(CORPUS) >= 25
    canary = tmp_path / "canary"
    canary.mkdir()
    http_port = free_port()
    config = base_node_config(tmp_path, model={"untrained_input_size": 128, "tta": False},
                              http={"enabled": True, "port": http_port, "token": TOKEN},
                              worker={"max_attempts": 1},
                              # One output per result: what is under test is intake, not the writers.
                              outputs={"positive": ["seg"], "negative": ["sc"]})
    node = NodeProcess(tmp_path, config)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    http_url = f"http://127.0.0.1:{http_port}"
    base = phantom(inputs)
    files: dict[str, Path] = {}
    uids: dict[str, str | None] = {}
    for name, mutate in CORPUS.items():
        ds = pydicom.dcmread(io.BytesIO(to_bytes(base)))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        result = mutate(ds, canary)
        data = result if isinstance(result, bytes) else to_bytes(result)
        files[name] = inputs / f"{name}.dcm"
        files[name].write_bytes(data)
        uids[name] = None if isinstance(result, bytes) else str(result.get("SOPInstanceUID", "")) or None

    good = phantom(inputs)
    good_path = inputs / "good.dcm"
    good.save_as(good_path, enforce_file_format=True)
    spool = Path(config["spool_dir"])
    before = files_outside(tmp_path, spool)
    node.start()
    try:
        answers: dict[str, dict[str, object]] = {}
        for name, path in files.items():
            answers[name] = {"dimse": c_store(node, path)}
            assert node.proc is not None and node.proc.poll() is None, f"node died on C-STORE of {name}"
        # Over STOW-RS too, each as its own request (a C-STORE copy already made a job: re-sent the
        # instance is a duplicate; then the answer, not a second row, is what is checked).
        for name, path in files.items():
            response = stow(http_url, [path.read_bytes()])
            answers[name]["stow"] = response.status_code
            assert response.status_code in (200, 202, 409), (name, response.status_code, response.text)
        whole = stow(http_url, [p.read_bytes() for p in files.values()])
        assert whole.status_code in (200, 202), whole.text
        boundary = "t1ny"
        tiny = httpx.post(http_url + "/dicom-web/studies", content=million_tiny_parts(boundary), timeout=120,
                          headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                                   "Authorization": f"Bearer {TOKEN}"})
        assert tiny.status_code == 413 and "more than 1000 parts" in tiny.json()["error"]

        # The node is still up: it echoes, answers /healthz, and takes a good image to DONE.
        echo = AE(ae_title="HOSTILE")
        echo.add_requested_context(Verification)
        assoc = echo.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established and assoc.send_c_echo().Status == DIMSE_SUCCESS
        assoc.release()
        assert httpx.get(http_url + "/healthz", timeout=30).status_code == 200
        assert c_store(node, good_path) == DIMSE_SUCCESS

        jobs = node.wait_for_terminal(1, timeout=240)
        by_uid = {}
        for job in jobs:
            by_uid.setdefault(job.sop_instance_uid, job)
        print("\n".join(f"{name:32} C-STORE {a['dimse']!s:>14}  STOW-RS {a['stow']}" for name, a in answers.items()))
        print("\n".join(f"job {j.id:3} {j.status:8} {j.error}" for j in jobs if j.status != JobStatus.DONE))
        for name, answer in answers.items():
            # 0xC211 is pynetdicom's answer when the node's handler raised: a failure without a reason.
            assert answer["dimse"] != 0xC211, f"{name}: the C-STORE handler raised"
            uid = uids[name]
            if answer["dimse"] == DIMSE_SUCCESS and uid:
                assert uid[:64] in by_uid, f"{name}: C-STORE answered Success but there is no job row"
        for job in jobs:
            assert job.status in TERMINAL_STATUSES
            if job.status != JobStatus.DONE:
                assert job.error and job.error.strip(), f"job {job.id} ({job.status}) has no reason"
                assert "Traceback" not in job.error
        assert node.proc is not None and node.proc.poll() is None
        assert by_uid[good.SOPInstanceUID].status == JobStatus.DONE, by_uid[good.SOPInstanceUID].error
    finally:
        node.stop()
    assert not list(canary.iterdir()), "a file was written through a path in a UID"
    forged = [line for line in node.log_text().splitlines() if line.startswith("FORGED") or "\x1b" in line]
    assert not forged, f"a value a sender chose made its own log line: {forged}"
    outside = files_outside(tmp_path, spool) - before
    expected = {"node.log", "jobs.sqlite", "jobs.sqlite-wal", "jobs.sqlite-shm", "broker.sqlite", "broker.sqlite-wal",
                "broker.sqlite-shm", "node.toml"}
    assert {p.name for p in outside} <= expected, sorted(str(p) for p in outside)
    # What the node made of the inputs it processed (a zero window width, a zero rescale slope,
    # text in an unknown character set, ...) must be valid DICOM too.
    outputs = [path for job in jobs if job.status == JobStatus.DONE and job.output_dir
               for path in sorted(Path(job.output_dir).glob("*.dcm"))]
    assert outputs
    invalid = {}
    for path in outputs:
        errors, _ = dciodvfy_errors(path)
        if errors:
            invalid[str(path.relative_to(spool))] = errors[:3]
    print(f"hostile corpus: {len(outputs)} outputs of DONE jobs checked with dciodvfy, {len(invalid)} invalid")
    assert not invalid, invalid

"""Header mutations: every header an archive may send gives valid outputs or a clear reason.

Runs what the worker runs around the model (node.preparation: selection, header
completion, pixel decoding; the SEG and SC builders on a fixed mask; the reason
recorded on a job row) on thousands of generated sources: the headers of
pydicom-data RG1_UNCR.dcm, deid-data animals/cat.dcm and a minimal DX, each mutated
one attribute at a time (deleted, emptied, invalid for its VR, over-long) and with
the text of each copied attribute in each character set (declared, and the same
bytes with no set declared). Each output must pass dciodvfy with 0 errors and read
back with highdicom; dciodvfy does not judge ISO_IR 192, GB18030 or ISO 2022 IR 149
bytes (measured: invalid bytes pass), so every output's text is also decoded
strictly with its declared set, and a declared source text must come back equal.
"""

from __future__ import annotations

import copy
import io
import os
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.charset import decode_bytes, python_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from node.config import load_config
from node.outputs import AlgorithmInfo, OutputPlan
from node.outputs.options import OutputKind
from node.outputs.sanitize import OUTPUT_TEXT_ATTRIBUTES, REQUIRED_ATTRIBUTES
from node.preparation import build_outputs, prepare_instance
from node.reasons import JobReason, ReasonCode, RefusedInstance, exception_text_in
from tests.conftest import RUN_NOTES
from tests.outputs_helpers import dciodvfy_errors, ellipse_mask, prediction_for
from tests.services import deid_file, pydicom_file, require_tool

pytestmark = pytest.mark.services

SHAPE = (256, 256)
ALGORITHM = AlgorithmInfo(name="unetpp-b4", version="0.0.0", checkpoint_sha256=None, untrained=True)
# Attributes whose damage may stop outputs (the "Done when"): pixel module, identity, selection.
PIXEL_MODULE = {
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
    "HighBit", "PixelRepresentation", "PixelData", "PlanarConfiguration", "NumberOfFrames",
    "SmallestImagePixelValue", "LargestImagePixelValue", "PixelAspectRatio",
}
IDENTITY = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"}
SELECTION = {"Modality", "BodyPartExamined", "ViewPosition"}
# One sample text per character set: (Specific Character Set, person name, other text)
CHARACTER_SETS = [
    ("ISO_IR 100", "Müller^Jürgen", "Klinik Köln"),
    ("ISO_IR 101", "Dvořák^Łukasz", "Nemocnice Plzeň"),
    ("ISO_IR 144", "Иванов^Иван", "Больница"),
    ("ISO_IR 126", "Παπαδόπουλος^Γιώργος", "Νοσοκομείο"),
    ("ISO_IR 148", "Öztürk^Ayşe", "Hastane Ağrı"),
    ("ISO_IR 192", "山田^太郎", "病院 Ärzte Иван"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "山田病院"),
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "서울병원"),
    ("GB18030", "王^小明", "北京医院"),
]
# written by the node itself at the top level of its outputs
OWN_ATTRIBUTES = {"Manufacturer", "ManufacturerModelName", "InstitutionName", "InstitutionalDepartmentName",
                  "StationName", "SeriesDescription", "SoftwareVersions", "DeviceSerialNumber"}
TEXT_VRS = {"SH", "LO", "ST", "LT", "PN", "UC", "UT"}
# A value invalid for each VR, and one longer than the VR allows (bytes as an archive holds them)
INVALID = {
    "AE": b"BAD\x01AE", "AS": b"29", "CS": b"lower-case!", "DA": b"2004-13-45", "DS": b"1,5",
    "DT": b"yesterday", "IS": b"1.5", "LO": b"a\x01b", "LT": b"\x00\x01", "PN": b"a^b^c^d^e^f^g",
    "SH": b"\x07bell", "ST": b"\x01", "TM": b"25:61", "UI": b"1.2.abc", "UC": b"\x01", "UT": b"\x02",
    "US": b"\x01\x02\x03", "SS": b"\x01\x02\x03", "UL": b"\x01\x02\x03", "SL": b"\x01\x02\x03",
    "FL": b"\x01\x02\x03", "FD": b"\x01\x02\x03",
}
MAX_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64, "LT": 10240,
              "PN": 64, "SH": 16, "ST": 1024, "TM": 14, "UI": 64}
OVERLONG_CHAR = {"AE": b"A", "AS": b"0", "CS": b"A", "DA": b"2", "DS": b"1", "DT": b"2", "IS": b"1",
                 "LO": b"x", "LT": b"x", "PN": b"x", "SH": b"x", "ST": b"x", "TM": b"1", "UI": b"1"}


@dataclass(frozen=True)
class Mutation:
    base: str
    attribute: str
    kind: str  # delete | empty | invalid | overlong | charset | charset-undeclared
    charset: str = ""

    def __str__(self) -> str:
        extra = f" [{self.charset}]" if self.charset else ""
        return f"{self.base}: {self.kind} {self.attribute}{extra}"


# --------------------------------------------------------------------------- bases


def _pixels(seed: int, bits_stored: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    image = (np.sin(xx / 17.0) + np.cos(yy / 23.0) + 2.0) / 4.0 * (2**bits_stored - 1)
    image += rng.normal(0, 2**bits_stored / 200, SHAPE)
    return np.clip(image, 0, 2**bits_stored - 1).astype(np.uint16)


def _with_small_pixels(ds: Dataset, seed: int) -> Dataset:
    ds = copy.deepcopy(ds)
    for keyword in ("PixelData", "LossyImageCompression", "LossyImageCompressionRatio",
                    "LossyImageCompressionMethod"):
        if keyword in ds:
            del ds[keyword]
    ds.Rows, ds.Columns = SHAPE
    ds.BitsAllocated = 16
    ds.HighBit = int(ds.BitsStored) - 1
    ds.PixelRepresentation = 0
    ds.PixelData = _pixels(seed, int(ds.BitsStored)).tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def minimal_dx() -> Dataset:
    """The smallest DX a modality may send: identity, pixel module, little else."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored = 12
    return _with_small_pixels(ds, 3)


def bases() -> dict[str, Dataset]:
    rg1 = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm"))
    cat = pydicom.dcmread(deid_file("animals/cat.dcm"))
    return {"RG1_UNCR": _with_small_pixels(rg1, 1), "cat": _with_small_pixels(cat, 2), "minimal DX": minimal_dx()}


# --------------------------------------------------------------------------- mutations


def _raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    if len(value) % 2:
        value += b"\x00" if vr == "UI" else b" "
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def encoded(text: str, vr: str, charset: str | list[str]) -> bytes:
    """`text` as pydicom writes it under `charset` (escape sequences included)."""
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.add_new(0x00100010 if vr == "PN" else 0x00081030, vr, text)
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    buffer.seek(0)
    back = pydicom.dcmread(buffer, force=True)
    return bytes(back.get_item(0x00100010 if vr == "PN" else 0x00081030).value)


def _sample_text(vr: str, name: str, other: str) -> str:
    if vr == "PN":
        return name
    return other[:5] if vr == "SH" else other


def mutations(base_name: str, ds: Dataset) -> list[Mutation]:
    """Each attribute of the base and each Type 1/2 attribute: deleted, emptied, invalid, over-long."""
    present = {keyword_for_tag(e.tag) for e in ds if not e.tag.is_private and e.tag != 0x7FE00010} - {""}
    found = [Mutation(base_name, "-", "unchanged")]
    for keyword in sorted(present | set(REQUIRED_ATTRIBUTES)):
        vr = dictionary_VR(tag_for_keyword(keyword))
        if keyword in present:  # deleting an absent attribute is the unchanged base
            found.append(Mutation(base_name, keyword, "delete"))
        found.append(Mutation(base_name, keyword, "empty"))
        if vr in INVALID:
            found.append(Mutation(base_name, keyword, "invalid"))
        if vr in MAX_LENGTH or vr in ("US", "SS", "UL", "SL", "FL", "FD"):
            found.append(Mutation(base_name, keyword, "overlong"))
    return found


def charset_mutations(base_names: list[str]) -> list[Mutation]:
    """Each copied text attribute in each character set, declared and undeclared; the bases
    take turns (every base gets every set, on different attributes) to keep the run short."""
    found = []
    turn = 0
    for keyword in OUTPUT_TEXT_ATTRIBUTES:
        if dictionary_VR(tag_for_keyword(keyword)) not in TEXT_VRS:
            continue
        for charset, _, _ in CHARACTER_SETS:
            label = "\\".join(charset) if isinstance(charset, list) else charset
            for kind in ("charset", "charset-undeclared"):
                found.append(Mutation(base_names[turn % len(base_names)], keyword, kind, label))
                turn += 1
    return found


def _charset_entry(label: str) -> tuple[str | list[str], str, str]:
    for charset, name, other in CHARACTER_SETS:
        if ("\\".join(charset) if isinstance(charset, list) else charset) == label:
            return charset, name, other
    raise KeyError(label)


def apply(ds: Dataset, mutation: Mutation) -> tuple[bytes, str | None]:
    """The mutated source as file bytes, and the text a declared character set must give back."""
    ds = copy.deepcopy(ds)
    expected_text = None
    tag = tag_for_keyword(mutation.attribute)
    vr = dictionary_VR(tag) if tag is not None else ""
    if mutation.kind == "unchanged":
        pass
    elif mutation.kind == "delete":
        if tag in ds:
            del ds[tag]
    elif mutation.kind == "empty":
        ds[tag] = _raw(tag, vr, b"") if vr != "SQ" else pydicom.DataElement(tag, "SQ", [])
    elif mutation.kind == "invalid":
        ds[tag] = _raw(tag, vr, INVALID[vr])
    elif mutation.kind == "overlong":
        if vr in MAX_LENGTH:
            ds[tag] = _raw(tag, vr, OVERLONG_CHAR[vr] * (MAX_LENGTH[vr] + 1))
        else:  # binary: more values than the attribute's multiplicity allows
            ds[tag] = _raw(tag, vr, b"\x01\x00" * 8)
    else:
        charset, name, other = _charset_entry(mutation.charset)
        text = _sample_text(vr, name, other)
        value = encoded(text, vr, charset)
        if mutation.kind == "charset":
            ds.SpecificCharacterSet = charset
            expected_text = text
        elif "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
        # written and read once with the new set: pydicom re-encodes raw text when the set changes
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        ds = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
        ds[tag] = _raw(tag, vr, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    if mutation.kind.startswith("charset"):
        written = pydicom.dcmread(io.BytesIO(buffer.getvalue())).get_item(tag).value
        assert bytes(written).rstrip(b" ") == value.rstrip(b" "), f"{mutation}: bytes not written as generated"
    return buffer.getvalue(), expected_text


# --------------------------------------------------------------------------- one source, as the worker


@dataclass
class Outcome:
    mutation: Mutation
    reason: JobReason | None = None
    paths: tuple[str, ...] = ()
    expected_text: str | None = None
    crash: str | None = None
    problems: tuple[str, ...] = ()  # what the output checks found (dciodvfy, highdicom, text)


_BASES: dict[str, Dataset] = {}
_CONFIG = None


def _init_worker(config_overrides: dict) -> None:
    global _CONFIG
    warnings.simplefilter("ignore")
    _BASES.update(bases())
    _CONFIG = load_config(None, environ={}, overrides=config_overrides)


def run_source(mutation: Mutation, out_dir: str) -> Outcome:
    outcome = Outcome(mutation)
    try:
        data, outcome.expected_text = apply(_BASES[mutation.base], mutation)
        ds = pydicom.dcmread(io.BytesIO(data))
        try:
            prepared = prepare_instance(ds, _CONFIG)
        except RefusedInstance as refused:
            outcome.reason = refused.reason
            return outcome
        mask = ellipse_mask(SHAPE)
        prediction = prediction_for(mask, prepared.source.pixel_spacing_mm)
        name = f"{abs(hash(str(mutation))):x}"
        built = build_outputs(prepared, prediction, OutputPlan((OutputKind.SEG, OutputKind.SC)), algorithm=ALGORITHM,
                              options=_CONFIG.outputs, uids={OutputKind.SEG: (hd.UID(), hd.UID()), OutputKind.SC: (hd.UID(), hd.UID())})
        paths = []
        for kind, obj in (("seg", built.seg), ("sc", built.sc)):
            path = Path(out_dir) / f"{name}-{kind}.dcm"
            obj.save_as(path, enforce_file_format=True)
            paths.append(str(path))
        outcome.paths = tuple(paths)
    except Exception as exc:  # noqa: BLE001 - a crash is what the test reports
        outcome.crash = f"{type(exc).__name__}: {exc}"
        return outcome
    # checked here, in the worker process: highdicom's reader is Python, threads would serialize it
    outcome.problems = tuple(check_output(outcome))
    return outcome


# --------------------------------------------------------------------------- checks of one output


def _strict_decode(raw: bytes, terms: list[str]) -> str:
    encodings = [python_encoding[t] for t in terms] if terms else ["ascii"]
    if terms and terms[0] in ("", "ISO_IR 6", "ISO 2022 IR 6"):
        leading = raw.split(b"\x1b", 1)[0]
        leading.decode("ascii")
    with pydicom.config.strict_reading():
        return decode_bytes(raw, encodings, {0x5E, 0x3D})


def text_problems(path: str, mutation: Mutation, expected_text: str | None) -> list[str]:
    """Text the declared set cannot decode, or a declared source text not given back."""
    ds = pydicom.dcmread(path)
    value = ds.get_item(0x00080005)
    if value is None:
        terms = []
    elif isinstance(value, RawDataElement):
        terms = [t.strip() for t in bytes(value.value or b"").decode("ascii").split("\\")]
    else:
        terms = [value.value] if isinstance(value.value, str) else list(value.value)
    terms = [] if terms == [""] else terms
    problems = []
    found_texts: list[str] = []
    target = tag_for_keyword(mutation.attribute) if mutation.kind != "unchanged" else None

    def visit(dataset: Dataset) -> None:
        for tag in list(dataset.keys()):
            element = dataset.get_item(tag)
            vr = element.VR
            if vr == "SQ":
                for item in dataset[tag].value:
                    visit(item)
                continue
            if vr not in TEXT_VRS or not isinstance(element, RawDataElement) or not element.value:
                continue
            try:
                text = _strict_decode(bytes(element.value), terms).rstrip(" \x00")
            except (UnicodeError, LookupError, ValueError):
                problems.append(f"{keyword_for_tag(tag)} bytes invalid for {terms or 'the default repertoire'}")
                continue
            # the outputs write their own equipment attributes (top level and contributing equipment)
            if tag == target and mutation.attribute not in OWN_ATTRIBUTES:
                found_texts.append(text)

    visit(ds)
    if expected_text is not None and found_texts and expected_text not in found_texts:
        problems.append(f"{mutation.attribute} reads back {found_texts!r}, source {expected_text!r}")
    return problems


def check_output(outcome: Outcome) -> list[str]:
    problems = []
    for path in outcome.paths:
        kind = "SEG" if path.endswith("-seg.dcm") else "SC"
        problems += [f"{kind} dciodvfy: {line}" for line in dciodvfy_errors(Path(path))[0]]
        problems += [f"{kind} text: {p}" for p in text_problems(path, outcome.mutation, outcome.expected_text)]
        try:
            if kind == "SEG":
                seg = hd.seg.segread(path)
                frame = seg.pixel_array
                if not np.array_equal(np.asarray(frame).reshape(SHAPE).astype(bool), ellipse_mask(SHAPE)):
                    problems.append("SEG frame is not the mask")
            else:
                hd.imread(path)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{kind} does not read back with highdicom: {type(exc).__name__}: {exc}")
    return problems


# --------------------------------------------------------------------------- the test


def _record_reasons(tmp_path: Path, refused: list[Outcome]) -> None:
    """Each refused source as a SKIPPED job row, recorded as the worker records it."""
    from sqlalchemy import insert

    from node.db import Job, JobStatus, get_engine, migrate
    from node.lease import claim
    from node.pipeline import _finish

    config = load_config(None, environ={}, overrides={"spool_dir": str(tmp_path / "spool"),
                                                      "database_url": f"sqlite:///{tmp_path / 'jobs.sqlite'}"})
    migrate(config.database_url)
    engine = get_engine(config.database_url)
    with engine.begin() as conn:
        ids = [int(conn.execute(insert(Job).values(status=JobStatus.RUNNING, sop_instance_uid=f"1.2.{i}"))
                   .inserted_primary_key[0]) for i in range(len(refused))]
    for job_id, outcome in zip(ids, refused, strict=True):
        lease = claim(config, job_id, [JobStatus.RUNNING], "header-mutation-test")
        assert lease is not None
        _finish(config, lease, JobStatus.SKIPPED, outcome.reason)
    with engine.connect() as conn:
        rows = conn.execute(Job.__table__.select()).fetchall()
    for row, outcome in zip(rows, refused, strict=True):
        assert row.reason_code == str(outcome.reason.code) and row.error == outcome.reason.sentence


def test_every_mutated_header_gives_valid_outputs_or_a_reason(tmp_path: Path) -> None:
    require_tool("dciodvfy")
    started = time.monotonic()
    all_bases = bases()
    corpus = [m for name, ds in all_bases.items() for m in mutations(name, ds)]
    corpus += charset_mutations(list(all_bases))
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    overrides = {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'unused.sqlite'}"}
    workers = min(5, (os.cpu_count() or 2) + 1)  # one more than the cores: dciodvfy runs are waited on
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(overrides,)) as pool:
        outcomes = list(pool.map(run_source, corpus, [str(out_dir)] * len(corpus), chunksize=16))
    produced = [o for o in outcomes if o.paths]
    checks = [o.problems for o in produced]

    failures = [f"{o.mutation}: crashed: {o.crash}" for o in outcomes if o.crash]
    refused = [o for o in outcomes if o.reason is not None]
    for outcome in refused:
        reason, mutation = outcome.reason, outcome.mutation
        allowed = mutation.attribute in PIXEL_MODULE | IDENTITY | SELECTION
        if not allowed:
            failures.append(f"{mutation}: no outputs ({reason}), but this attribute may not stop them")
        if reason.code not in set(ReasonCode) or exception_text_in(reason.sentence):
            failures.append(f"{mutation}: reason {reason} is not a documented code with a plain sentence")
    for outcome, problems in zip(produced, checks, strict=True):
        failures += [f"{outcome.mutation}: {p}" for p in problems]
    _record_reasons(tmp_path, refused)

    by_code = Counter(str(o.reason.code) for o in refused)
    valid = sum(1 for problems in checks if not problems)
    note = (f"header mutations: {len(corpus)} sources tried, {valid} gave valid SEG+SC "
          f"({2 * valid} outputs, 0 dciodvfy errors, read back with highdicom), "
          f"{len(refused)} skipped with a reason: {dict(sorted(by_code.items()))}, "
          f"{sum(1 for o in outcomes if o.crash)} crashed; "
          f"{time.monotonic() - started:.0f} s with {workers} processes")
    print("\n" + note)
    RUN_NOTES.append(note)
    assert not failures, f"{len(failures)} problem(s):\n" + "\n".join(failures[:60])
    assert len(corpus) >= 500 and valid + len(refused) == len(corpus)

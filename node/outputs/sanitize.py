"""Turn any source header into the header every output (SEG, SC, SR, GSPS) copies.

`prepare_source_header` is the one place that does it; `sanitize_source` returns just
its dataset. In order:

1. Identity: a missing or invalid Study, Series or SOP Instance UID (or SOP Class UID)
   refuses the instance (`RefusedInstance`, code ``missing-uid``); UIDs are never
   invented or changed.
2. Character set: text (SH, LO, ST, LT, PN, UC, UT) is decoded with the source's
   Specific Character Set. When every value decodes, the output keeps that set (an
   empty first value of a code-extension set is written ``ISO 2022 IR 6``, as PS3.3
   C.12.1.1.2 means it). When a value's bytes are invalid for the declared set (or for
   the default repertoire when none is declared, e.g. 8-bit Cyrillic with no set), or
   the declared set is unknown, the repair is: valid UTF-8 is read as UTF-8, anything
   else with the stated fallback (`fallback_character_set`, default ISO_IR 100, which
   reads every byte), and the output declares ISO_IR 192 (UTF-8) for all its text.
   The repair, never the values, is logged and returned in `repairs`.
3. VRs: every string value is made valid for its VR: repaired when the intent is clear
   ("29" -> "029Y" for AS, "2004-08-26" -> "20040826"), emptied otherwise. Binary
   values of the wrong length are dropped; so are private elements.
4. Completion: the Type 2 attributes of the Patient, General Study, General Series,
   General Equipment and General Image modules that highdicom reads with plain
   attribute access are present (empty when unknown); a missing Modality (Type 1) is
   written ``OT`` ("other", PS3.3 C.7.3.1.1.1).

The result is accepted by highdicom's SEG, SC, SR and GSPS constructors. A header this
function returned is recognised and handed back (in a new container) without a second
pass: the worker prepares once and each writer asks again; edit a copy of the source,
not a prepared header, if it must be prepared anew.
"""

from __future__ import annotations

import codecs
import copy
import datetime
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import highdicom.enum as hd_enum
import pydicom
from pydicom.charset import ESC, decode_bytes, python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import (
    MAX_VALUE_LEN,
    PN_DELIMS,
    STR_VR_REGEXES,
    TEXT_VR_DELIMS,
    format_number_as_ds,
)

from node.reasons import JobReason, ReasonCode, RefusedInstance

__all__ = [
    "DEFAULT_FALLBACK_CHARACTER_SET",
    "OUTPUT_TEXT_ATTRIBUTES",
    "REQUIRED_ATTRIBUTES",
    "SourceHeader",
    "check_character_set_name",
    "check_identity",
    "prepare_source_header",
    "sanitize_source",
]

logger = logging.getLogger(__name__)

DEFAULT_FALLBACK_CHARACTER_SET = "ISO_IR 100"
UTF8 = "ISO_IR 192"

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# spacings of zero or below are "unknown" written badly; dciodvfy rejects them
_SPACING_KEYWORDS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")
# enumerated values (PS3.3) of the attributes highdicom copies from a source
_ENUMERATED = {
    "PatientSex": {"M", "F", "O"},
    "PatientSexNeutered": {"ALTERED", "UNALTERED"},
    "QualityControlSubject": {"YES", "NO"},
}
_SEX_SYNONYMS = {"MALE": "M", "FEMALE": "F", "OTHER": "O"}
# values whose bytes tell the receiver how to decode everything else: left alone
_UNTOUCHED_KEYWORDS = {"SpecificCharacterSet"}

_ASCII_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"}
_TEXT_VRS = {"LO", "SH", "ST", "LT", "PN"}
# values are decoded text here: an ESC left over is noise, C1 controls are in no repertoire
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")  # ST/LT keep TAB LF FF CR
_AGE = re.compile(r"^(\d{1,3})\s*([DWMY]?)$")
_DATE_SEPARATED = re.compile(r"^(\d{4})[-./](\d{2})[-./](\d{2})$")
_TIME = re.compile(r"^([01]\d|2[0-3])(([0-5]\d)(([0-5]\d|60)(\.\d+)?)?)?$")
_INT32 = (-(2**31), 2**31 - 1)

_IDENTIFYING_UIDS = {
    "StudyInstanceUID": "Study Instance UID",
    "SeriesInstanceUID": "Series Instance UID",
    "SOPInstanceUID": "SOP Instance UID",
    "SOPClassUID": "SOP Class UID",
}
# Type 2 attributes of the modules the outputs copy (PS3.3 C.7.1.1 Patient, C.7.2.1 General
# Study, C.7.3.1 General Series, C.7.5.1 General Equipment, C.7.6.1 General Image): present,
# empty when unknown. highdicom reads the first ones with plain attribute access.
REQUIRED_ATTRIBUTES: dict[str, int] = {
    "PatientName": 2, "PatientID": 2, "PatientBirthDate": 2, "PatientSex": 2,
    "StudyInstanceUID": 1, "StudyDate": 2, "StudyTime": 2, "ReferringPhysicianName": 2,
    "StudyID": 2, "AccessionNumber": 2,
    "Modality": 1, "SeriesInstanceUID": 1, "SeriesNumber": 2,
    "Manufacturer": 2,
    "InstanceNumber": 2,
    "SOPClassUID": 1, "SOPInstanceUID": 1,
}
_STATED_TYPE1 = {"Modality": "OT"}
# Free text the outputs copy from the source (patient, study, equipment modules)
OUTPUT_TEXT_ATTRIBUTES = (
    "PatientName", "PatientID", "OtherPatientNames", "PatientComments", "EthnicGroup",
    "ReferringPhysicianName", "StudyDescription", "StudyID", "AccessionNumber",
    "AdmittingDiagnosesDescription", "AdditionalPatientHistory", "Occupation",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "Manufacturer", "ManufacturerModelName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
)

_CHARSET_VRS = {"SH", "LO", "ST", "LT", "PN", "UC", "UT"}
_SINGLE_VALUE_TEXT_VRS = {"ST", "LT", "UT"}  # a backslash is text, not a delimiter
_DEFAULT_REPERTOIRE = {"", "ISO_IR 6", "ISO 2022 IR 6"}
_BINARY_SIZES = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "AT": 4, "UV": 8, "SV": 8}
_ISO_IR = re.compile(r"^ISO[-_ ]?IR[-_ ]?(\d+)$")
_ISO_2022 = re.compile(r"^ISO[-_ ]?2022[-_ ]?IR[-_ ]?(\d+)$")
_LEADING_FRAGMENT = re.compile(rb"^[^\x1b]*")


@dataclass(frozen=True)
class SourceHeader:
    """The header the outputs copy, and what had to change to get it (no values)."""

    dataset: pydicom.Dataset
    repairs: tuple[str, ...]


def check_character_set_name(name: str) -> str:
    """A DICOM defined term (single-byte, ISO_IR 192, GB18030) or a Python codec name."""
    if name in python_encoding and not name.startswith("ISO 2022"):
        return name
    try:
        codecs.lookup(name)
    except LookupError:
        raise ValueError(
            f"{name!r} is neither a DICOM character set (e.g. ISO_IR 100, ISO_IR 144) "
            "nor a codec name (e.g. cp1251, koi8_r)."
        ) from None
    return name


def prepare_source_header(
    ds: pydicom.Dataset,
    *,
    keep_pixel_data: bool = False,
    fallback_character_set: str = DEFAULT_FALLBACK_CHARACTER_SET,
) -> SourceHeader:
    """The header every output copies (see the module doc); raises `RefusedInstance`."""
    if not isinstance(ds, pydicom.Dataset):
        raise TypeError("prepare_source_header expects a pydicom.Dataset.")
    check_character_set_name(fallback_character_set)
    if getattr(ds, "_ptx_prepared", False) and not keep_pixel_data:
        # already the output of this function (the worker prepares once, each writer asks
        # again): a new container of the same elements, so a writer's edits stay its own
        return SourceHeader(_flagged(_shallow_copy(ds)), ())
    check_identity(ds)
    out = pydicom.Dataset()
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    for tag in ds.keys():
        keyword = pydicom.datadict.keyword_for_tag(tag)
        if keyword in _PIXEL_DATA_KEYWORDS and not keep_pixel_data:
            continue
        if BaseTag(tag).is_private:
            continue
        out[tag] = copy.deepcopy(ds.get_item(tag))
    repairs: list[str] = []
    _CharacterSetRepair(out, fallback_character_set, repairs).apply()
    _sanitize_in_place(out, repairs)
    _complete(out, repairs)
    return SourceHeader(_flagged(out), tuple(repairs))


def _shallow_copy(ds: pydicom.Dataset) -> pydicom.Dataset:
    out = pydicom.Dataset()
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    for tag in ds.keys():
        out[tag] = ds.get_item(tag)
    return out


def _flagged(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds._ptx_prepared = True
    return ds


def sanitize_source(
    ds: pydicom.Dataset,
    *,
    keep_pixel_data: bool = False,
    fallback_character_set: str = DEFAULT_FALLBACK_CHARACTER_SET,
) -> pydicom.Dataset:
    """The dataset of `prepare_source_header` (kept for the writers that call it)."""
    return prepare_source_header(
        ds, keep_pixel_data=keep_pixel_data, fallback_character_set=fallback_character_set
    ).dataset


# --- 1. identity ------------------------------------------------------------------------------

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def check_identity(ds: pydicom.Dataset) -> None:
    """Raise `RefusedInstance` (missing-uid) unless the identifying UIDs are present and valid."""
    for keyword, name in _IDENTIFYING_UIDS.items():
        text = _raw_ascii(ds, keyword)
        if not text or len(text) > 64 or not _UID.match(text):
            raise RefusedInstance(JobReason(
                ReasonCode.MISSING_UID,
                f"the {name} is missing or not a valid UID; the node never invents one, "
                "so the instance cannot get outputs in its study",
            ))


def _raw_ascii(ds: pydicom.Dataset, keyword: str) -> str:
    """An ASCII-VR value as text, read from the raw bytes (pydicom's conversion may raise)."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return ""
    element = ds.get_item(tag)
    if isinstance(element, RawDataElement):
        return bytes(element.value or b"").decode("latin-1").strip("\x00 ")
    value = element.value
    return "" if value is None else str(value).strip("\x00 ")


# --- 2. character set -------------------------------------------------------------------------


class _CharacterSetRepair:
    """Decode every text value with the declared set; repair into UTF-8 where that fails."""

    def __init__(self, ds: pydicom.Dataset, fallback: str, repairs: list[str]) -> None:
        self.ds = ds
        self.fallback_codec = python_encoding.get(fallback, fallback)
        self.fallback = fallback
        self.repairs = repairs
        self.declared, self.declared_problem = _declared_terms(ds)
        self.encodings = [python_encoding[t] for t in self.declared] if self.declared else ["ascii"]
        self.invalid: list[str] = []  # keywords whose bytes the declared set cannot read
        self.unencodable = False  # a decoded (in-memory) value the declared set cannot write
        self.decoded: list[tuple[pydicom.Dataset, int, str, list[str] | None, bytes | None]] = []

    def apply(self) -> None:
        self._collect(self.ds)
        needs_utf8 = bool(self.invalid) or self.declared_problem is not None or self.unencodable
        for item, tag, vr, values, raw in self.decoded:
            if values is None:  # invalid for the declared set: the stated repair
                values = _split(vr, _decode_fallback(raw or b"", self.fallback_codec, vr))
            _set_text(item, tag, vr, values)
        if not needs_utf8:
            if self.declared:
                _set_character_set(self.ds, self.declared)
            elif "SpecificCharacterSet" in self.ds:
                del self.ds.SpecificCharacterSet  # empty: the default repertoire
            return
        _set_character_set(self.ds, [UTF8])
        if self.declared_problem is not None:
            why = self.declared_problem
        elif self.invalid:
            names = sorted(set(self.invalid))
            where = "the declared character set" if self.declared else "the default repertoire (none declared)"
            why = (f"{len(self.invalid)} text value(s) ({', '.join(names[:6])}{'...' if len(names) > 6 else ''}) "
                   f"had bytes invalid for {where}; read as UTF-8 where valid, else as {self.fallback}")
        else:
            why = "text not representable in the declared character set"
        message = f"character set repaired: {why}; the outputs declare ISO_IR 192 (UTF-8)"
        logger.info("%s", message)
        self.repairs.append(message)

    def _collect(self, ds: pydicom.Dataset) -> None:
        for tag in list(ds.keys()):
            if BaseTag(tag).is_private:
                continue
            element = ds.get_item(tag)
            vr = _vr_of(element)
            if vr == "SQ":
                for item in ds[tag].value or []:
                    self._collect(item)
                continue
            if vr not in _CHARSET_VRS:
                continue
            keyword = pydicom.datadict.keyword_for_tag(tag) or str(BaseTag(tag))
            raw = _raw_text_bytes(element)
            if raw is None:  # already text in memory
                values = _text_values(element.value)
                if not _encodable(values, self.encodings):
                    self.unencodable = True
                self.decoded.append((ds, tag, vr, values, None))
                continue
            values = self._decode_declared(raw, vr)
            if values is None:
                self.invalid.append(keyword)
            self.decoded.append((ds, tag, vr, values, raw))

    def _decode_declared(self, raw: bytes, vr: str) -> list[str] | None:
        if self.declared_problem is not None:
            return None
        first = self.declared[0] if self.declared else ""
        if first in _DEFAULT_REPERTOIRE and not _LEADING_FRAGMENT.match(raw).group(0).isascii():
            return None  # 8-bit bytes where only ASCII is allowed (PS3.5 6.1.2.3)
        if ESC in raw and not any(t.startswith("ISO 2022") for t in self.declared):
            return None  # escape sequences without a code-extension set to give them meaning
        if not self.declared:
            return _split(vr, raw.decode("ascii"))
        try:
            with pydicom.config.strict_reading():
                if ESC in raw:
                    delimiters = {0x3D} | PN_DELIMS if vr == "PN" else TEXT_VR_DELIMS
                    text = decode_bytes(raw, self.encodings, delimiters)
                else:
                    text = raw.decode(self.encodings[0])
        except (UnicodeError, LookupError, ValueError):
            return None
        values = _split(vr, text)
        if any(_C1_CONTROL.search(v) for v in values):
            return None  # C1 controls are in no DICOM repertoire: bytes meant for another set
        return values


_C1_CONTROL = re.compile(r"[\x80-\x9f]")
_WRITABLE_SETS = {v.value for v in hd_enum.SpecificCharacterSetValues}
# every ISO 2022 set pydicom reads: escape sequences in bytes declared with no set are
# read by what they announce (PS3.5 6.1.2.5) before falling back
_ISO_2022_CODECS = ["iso8859", *sorted({c for t, c in python_encoding.items() if t.startswith("ISO 2022")} - {"iso8859"})]


def _declared_terms(ds: pydicom.Dataset) -> tuple[list[str], str | None]:
    """The normalized Specific Character Set terms, and why they cannot be used (or None)."""
    if "SpecificCharacterSet" not in ds:
        return [], None
    element = ds.get_item(0x00080005)
    raw = element.value
    if isinstance(raw, (bytes, bytearray)):
        text = bytes(raw).decode("latin-1")
        terms = text.split("\\")
    elif isinstance(raw, (list, MultiValue)):
        terms = [str(t) for t in raw]
    else:
        terms = [str(raw or "")]
    terms = [_normalize_term(t) for t in terms]
    if len(terms) == 1 and terms[0] == "":
        return [], None
    if len(terms) > 1 and terms[0] == "":
        terms[0] = "ISO 2022 IR 6"  # an empty first value means the default G0 (PS3.3 C.12.1.1.2)
    unknown = [t for t in terms if t not in python_encoding]
    if unknown:
        return [], "the declared Specific Character Set is not a DICOM defined term"
    if any(t not in _WRITABLE_SETS for t in terms):
        # highdicom 0.28 refuses some defined terms (it lists Korean as ISO 2022 IR 159)
        return [], "the declared Specific Character Set is one the output writers cannot declare"
    if len(terms) > 1 and any(t in ("ISO_IR 192", "GB18030", "GBK") for t in terms):
        return [], "the declared Specific Character Set combines a stand-alone set with code extensions"
    return terms, None


def _normalize_term(term: str) -> str:
    text = term.strip().upper()
    if text in python_encoding:
        return text
    if match := _ISO_2022.match(text):
        return f"ISO 2022 IR {match.group(1)}"
    if match := _ISO_IR.match(text):
        return f"ISO_IR {match.group(1)}"
    return text


def _set_character_set(ds: pydicom.Dataset, terms: list[str]) -> None:
    ds.SpecificCharacterSet = terms[0] if len(terms) == 1 else list(terms)


def _raw_text_bytes(element: DataElement | RawDataElement) -> bytes | None:
    if isinstance(element, RawDataElement):
        return bytes(element.value or b"")
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (list, MultiValue)) and value and all(isinstance(v, (bytes, bytearray)) for v in value):
        return b"\\".join(bytes(v) for v in value)
    if isinstance(value, pydicom.valuerep.PersonName) and value.original_string is not None and not value._components:
        return bytes(value.original_string)
    return None


def _text_values(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def _encodable(values: Sequence[str], encodings: Sequence[str]) -> bool:
    for value in values:
        if value.isascii():
            continue
        if not any(_can_encode(value, e) for e in encodings):
            return False
    return True


def _can_encode(value: str, encoding: str) -> bool:
    try:
        value.encode(encoding)
    except (UnicodeError, LookupError):
        return False
    return True


def _split(vr: str, text: str) -> list[str]:
    text = text.rstrip("\x00 ")
    if not text:
        return []
    if vr in _SINGLE_VALUE_TEXT_VRS:
        return [text]
    return [v.rstrip("\x00 ") for v in text.split("\\")]


def _decode_fallback(raw: bytes, codec: str, vr: str) -> str:
    if ESC in raw:
        try:
            with pydicom.config.strict_reading():
                delimiters = {0x3D} | PN_DELIMS if vr == "PN" else TEXT_VR_DELIMS
                return decode_bytes(raw, _ISO_2022_CODECS, delimiters)
        except (UnicodeError, LookupError, ValueError):
            pass
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode(codec, errors="replace")


def _set_text(ds: pydicom.Dataset, tag: int, vr: str, values: list[str]) -> None:
    """Write decoded text back as plain strings: pydicom then encodes it in the output's set."""
    if not values:
        ds[tag] = DataElement(tag, vr, "")
    else:
        ds[tag] = DataElement(tag, vr, values[0] if len(values) == 1 else values)


# --- 3. VRs -------------------------------------------------------------------------------------


def _sanitize_in_place(ds: pydicom.Dataset, repairs: list[str]) -> None:
    for tag in list(ds.keys()):
        if BaseTag(tag).is_private:
            del ds[tag]
            continue
        raw = ds.get_item(tag)
        vr = _vr_of(raw)
        keyword = pydicom.datadict.keyword_for_tag(tag) or str(BaseTag(tag))
        if vr == "SQ":
            try:
                items = ds[tag].value
            except Exception:  # noqa: BLE001 - an undecodable sequence is dropped, not copied
                items = None
            if items is None:
                _note(repairs, f"dropped {keyword}: unreadable sequence")
                del ds[tag]
                continue
            for item in items:
                _sanitize_in_place(item, repairs)
            continue
        if vr in _BINARY_SIZES:
            if not _binary_length_ok(raw, vr):
                _note(repairs, f"dropped {keyword}: value length invalid for {vr}")
                del ds[tag]
            continue
        if vr not in _FIXERS or keyword in _UNTOUCHED_KEYWORDS:
            continue
        values = _string_values(ds, tag, raw, vr)
        if not values:
            continue
        fixed = _fix_values(keyword, vr, values)
        if fixed is not None:
            fixed = _fit_multiplicity(tag, vr, fixed)
        if fixed is None and keyword in _SPACING_KEYWORDS:
            _note(repairs, f"dropped {keyword}: no valid positive spacing")
            del ds[tag]
        elif fixed is None:
            _note(repairs, f"emptied {keyword}: invalid {vr} value")
            ds[tag] = DataElement(tag, vr, "")
        elif fixed != values:
            _note(repairs, f"repaired {keyword} ({vr})")
            ds[tag] = DataElement(tag, vr, fixed if len(fixed) > 1 else fixed[0])


def _note(repairs: list[str], message: str) -> None:
    logger.info("%s", message)
    repairs.append(message)


def _binary_length_ok(element: DataElement | RawDataElement, vr: str) -> bool:
    if isinstance(element, RawDataElement):
        return element.value is None or len(element.value) % _BINARY_SIZES[vr] == 0
    return True  # built in memory: pydicom checked the type


def _fit_multiplicity(tag: int, vr: str, values: list[str]) -> list[str] | None:
    """More values than the attribute allows: text is joined (its intent), anything else emptied."""
    try:
        vm = dictionary_VM(tag)
    except KeyError:
        return values
    if vm != "1" or len(values) <= 1:
        return values
    if vr in _TEXT_VRS and vr != "PN":
        return [_FIXERS[vr](" ".join(values)) or ""]
    return None


# --- 4. completion ------------------------------------------------------------------------------


# Type 2C of the Patient (C.7.1.1) and Patient Study (C.7.2.2) modules for an animal
_NON_HUMAN_TYPE_2C = ("PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence",
                      "ResponsiblePerson", "ResponsibleOrganization", "PatientSexNeutered")
# only meaningful for an animal: without a species they make a validator ask for one (Type 1C)
_ANIMAL_ONLY = ("PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence",
                "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization",
                "PatientSpeciesDescription", "PatientSpeciesCodeSequence")


def _complete(ds: pydicom.Dataset, repairs: list[str]) -> None:
    required = dict(REQUIRED_ATTRIBUTES)
    if ds.get("PatientSpeciesDescription") or ds.get("PatientSpeciesCodeSequence"):
        required.update(dict.fromkeys(_NON_HUMAN_TYPE_2C, 2))
    else:
        present = [k for k in _ANIMAL_ONLY if k in ds]
        for keyword in present:
            del ds[keyword]
        if present:
            _note(repairs, f"dropped {', '.join(present)}: animal-patient attributes without a species")
    if ds.get("ResponsiblePerson") and not ds.get("ResponsiblePersonRole"):
        ds.ResponsiblePerson = None  # a person without the role the standard requires with it
        _note(repairs, "emptied ResponsiblePerson: no ResponsiblePersonRole")
    for keyword, attribute_type in required.items():
        present = keyword in ds and not ds[keyword].is_empty
        if present:
            continue
        if attribute_type == 2:
            if keyword not in ds:
                setattr(ds, keyword, [] if keyword.endswith("Sequence") else None)
                _note(repairs, f"added {keyword} empty (Type 2, unknown in the source)")
        elif keyword in _STATED_TYPE1:
            setattr(ds, keyword, _STATED_TYPE1[keyword])
            _note(repairs, f"set {keyword} to {_STATED_TYPE1[keyword]} (Type 1, missing in the source)")


def _vr_of(element: DataElement | RawDataElement) -> str | None:
    vr = element.VR
    if vr is None:  # implicit VR transfer syntax, not yet converted
        try:
            vr = dictionary_VR(element.tag)
        except KeyError:
            return None
    return str(vr)


def _string_values(
    ds: pydicom.Dataset, tag: int, raw: DataElement | RawDataElement, vr: str
) -> list[str]:
    """The element's values as strings, read from the raw bytes where converting could raise."""
    if isinstance(raw, RawDataElement) and vr in _ASCII_VRS:
        if raw.value is None:
            return []
        text = bytes(raw.value).decode("latin-1").rstrip("\x00 ")
        return text.split("\\") if text else []
    value = ds[tag].value
    if value is None or value == "":
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(item) for item in value]
    return [str(value)]


def _fix_values(keyword: str, vr: str, values: list[str]) -> list[str] | None:
    fixer = _FIXERS[vr]
    fixed: list[str] = []
    for value in values:
        result = value if value == "" else fixer(value)
        if result is None:
            return None
        fixed.append(result)
    if keyword == "PatientSex":
        fixed = [_SEX_SYNONYMS.get(v, v) for v in fixed]
    if keyword in _ENUMERATED and any(v and v not in _ENUMERATED[keyword] for v in fixed):
        return None
    if keyword in _SPACING_KEYWORDS and (len(fixed) != 2 or any(float(v) <= 0 for v in fixed)):
        return None
    return fixed


def _fix_as(value: str) -> str | None:
    match = _AGE.match(value.strip().upper())
    if match is None:
        return None
    # a bare number is years: SIIM-ACR and others write "29" for "029Y"
    return f"{int(match.group(1)):03d}{match.group(2) or 'Y'}"


def _fix_da(value: str) -> str | None:
    text = value.strip()
    separated = _DATE_SEPARATED.match(text)
    if separated:
        text = "".join(separated.groups())
    try:
        datetime.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return None
    return text if len(text) == 8 else None


def _fix_tm(value: str) -> str | None:
    text = value.strip().replace(":", "")  # ACR-NEMA style "18:50:59"
    match = _TIME.match(text)
    if match is None:
        return None
    if "." in text:
        whole, fraction = text.split(".", 1)
        text = f"{whole}.{fraction[:6]}" if len(whole) == 6 else whole
    return text


def _fix_dt(value: str) -> str | None:
    text = value.strip()
    return text if STR_VR_REGEXES["DT"].match(text) and len(text) <= 26 else None


def _fix_ds(value: str) -> str | None:
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    if len(text) <= MAX_VALUE_LEN["DS"] and STR_VR_REGEXES["DS"].match(text):
        return text
    return format_number_as_ds(number)


def _fix_is(value: str) -> str | None:
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        return None
    if not number.is_integer() or not _INT32[0] <= number <= _INT32[1]:
        return None
    return text if STR_VR_REGEXES["IS"].match(text) else str(int(number))


def _fix_cs(value: str) -> str | None:
    text = _CONTROL.sub("", value).strip().upper()
    text = re.sub(r"[^A-Z0-9 _]", "_", text)
    return text[: MAX_VALUE_LEN["CS"]].rstrip()


def _fix_ae(value: str) -> str | None:
    text = re.sub(r"[^\x20-\x7e]", "", value).strip()
    return text[: MAX_VALUE_LEN["AE"]] if text else None


def _truncating(max_length: int, control: re.Pattern[str]) -> Callable[[str], str | None]:
    def fix(value: str) -> str | None:
        return control.sub("", value)[:max_length]

    return fix


def _fix_pn(value: str) -> str | None:
    groups = _CONTROL.sub("", value).split("=")[:3]
    # PS3.5 6.2: each component group at most 64 characters, at most 5 components
    return "=".join("^".join(group.split("^")[:5])[:64] for group in groups)


def _fix_ui(value: str) -> str | None:
    return value  # an identity: never rewritten, even when malformed


_FIXERS: dict[str, Callable[[str], str | None]] = {
    "AE": _fix_ae,
    "AS": _fix_as,
    "CS": _fix_cs,
    "DA": _fix_da,
    "DS": _fix_ds,
    "DT": _fix_dt,
    "IS": _fix_is,
    "TM": _fix_tm,
    "UI": _fix_ui,
    "LO": _truncating(64, _CONTROL),
    "SH": _truncating(16, _CONTROL),
    "ST": _truncating(1024, _CONTROL_TEXT),
    "LT": _truncating(10240, _CONTROL_TEXT),
    "PN": _fix_pn,
    "UC": _truncating(2**32 - 2, _CONTROL),
    "UT": _truncating(2**32 - 2, _CONTROL_TEXT),
}

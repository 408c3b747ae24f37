"""Make a source header safe to copy into a SEG or SC.

Real archives hold values their VR forbids (SIIM-ACR: PatientAge "29"; RG1_UNCR:
PixelSpacing 0\\0). highdicom copies patient, study and equipment attributes from
the source verbatim, so an invalid value there makes the output fail validation.
`sanitize_source` returns a copy in which every string value is valid for its VR:
repaired when the intent is clear ("29" -> "029Y", "2004-08-26" -> "20040826"),
emptied otherwise. UIDs are never changed (they are the study's identity).
"""

from __future__ import annotations

import copy
import datetime
import logging
import math
import re
from collections.abc import Callable

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import MAX_VALUE_LEN, STR_VR_REGEXES, format_number_as_ds

__all__ = ["sanitize_source"]

logger = logging.getLogger(__name__)

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
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")  # all C0 controls but ESC
_CONTROL_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")  # ST/LT keep TAB LF FF CR
_AGE = re.compile(r"^(\d{1,3})\s*([DWMY]?)$")
_DATE_SEPARATED = re.compile(r"^(\d{4})[-./](\d{2})[-./](\d{2})$")
_TIME = re.compile(r"^([01]\d|2[0-3])(([0-5]\d)(([0-5]\d|60)(\.\d+)?)?)?$")
_INT32 = (-(2**31), 2**31 - 1)


def sanitize_source(ds: pydicom.Dataset, *, keep_pixel_data: bool = False) -> pydicom.Dataset:
    """Return a copy of `ds` whose values are valid for their VRs (see module doc).

    Private elements are dropped; pixel data too unless `keep_pixel_data` (highdicom
    needs only the header).
    """
    if not isinstance(ds, pydicom.Dataset):
        raise TypeError("sanitize_source expects a pydicom.Dataset.")
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
    _sanitize_in_place(out)
    return out


def _sanitize_in_place(ds: pydicom.Dataset) -> None:
    for tag in list(ds.keys()):
        if BaseTag(tag).is_private:
            del ds[tag]
            continue
        raw = ds.get_item(tag)
        vr = _vr_of(raw)
        if vr == "SQ":
            for item in ds[tag].value:
                _sanitize_in_place(item)
            continue
        keyword = pydicom.datadict.keyword_for_tag(tag)
        if vr not in _FIXERS or keyword in _UNTOUCHED_KEYWORDS:
            continue
        values = _string_values(ds, tag, raw, vr)
        if not values:
            continue
        fixed = _fix_values(keyword, vr, values)
        if fixed is None and keyword in _SPACING_KEYWORDS:
            logger.info("dropped %s: no valid positive spacing", keyword)
            del ds[tag]
        elif fixed is None:
            logger.info("emptied %s: invalid %s value", keyword or tag, vr)
            ds[tag] = DataElement(tag, vr, "")
        elif fixed != values:
            logger.info("repaired %s (%s)", keyword or tag, vr)
            ds[tag] = DataElement(tag, vr, fixed if len(fixed) > 1 else fixed[0])


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
}

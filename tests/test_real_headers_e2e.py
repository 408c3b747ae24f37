"""Headers real archives send, through the whole node: Orthanc routes them, the node
answers with a SEG and an SC that pass dciodvfy, with the patient's name as the source
wrote it.

Four radiographs: a DX without PatientBirthDate (de-identified exports), one whose
names, manufacturer and diagnosis text are Cyrillic 8-bit bytes with no Specific
Character Set (seen from a DX detector), one with ISO_IR 192 Japanese names and one
with ISO 2022 IR 87 (JIS X 0208 with escape sequences).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from node.db import JobStatus
from tests.services import Orthanc
from tests.test_node_e2e import dciodvfy_errors, make_phantom, node_for, outputs_in_orthanc

pytestmark = [pytest.mark.services, pytest.mark.slow]

DX = "1.2.840.10008.5.1.4.1.1.1.1"


def _raw_text(ds: pydicom.Dataset, keyword: str, vr: str, value: bytes) -> None:
    if len(value) % 2:
        value += b" "
    tag = pydicom.datadict.tag_for_keyword(keyword)
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _as_dx(path: Path, **attrs: object) -> pydicom.Dataset:
    ds = pydicom.dcmread(make_phantom(path, seed=len(path.name), **attrs))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX
    ds.Modality = "DX"
    return ds


def real_world_headers(folder: Path) -> dict[str, tuple[Path, str | None]]:
    """name -> (file, the patient name as text when the source declares its set)."""
    folder.mkdir()
    files: dict[str, tuple[Path, str | None]] = {}

    ds = _as_dx(folder / "no-birth-date.dcm")
    del ds.PatientBirthDate
    ds.save_as(folder / "no-birth-date.dcm", enforce_file_format=True)
    files["no PatientBirthDate"] = (folder / "no-birth-date.dcm", str(ds.PatientName))

    # Written once without a set, then the 8-bit bytes put in raw: pydicom would re-encode them.
    ds = _as_dx(folder / "cyrillic.dcm")
    del ds.SpecificCharacterSet
    ds.save_as(folder / "cyrillic.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(folder / "cyrillic.dcm")
    _raw_text(ds, "PatientName", "PN", "Петров^Сергей".encode("cp1251"))
    _raw_text(ds, "Manufacturer", "LO", "Рентгенпром".encode("cp1251"))
    _raw_text(ds, "InstitutionName", "LO", "Городская больница №1".encode("cp1251"))
    _raw_text(ds, "StudyDescription", "LO", "Пневмоторакс справа?".encode("cp1251"))
    ds.save_as(folder / "cyrillic.dcm", enforce_file_format=True)
    files["Cyrillic 8-bit, no set"] = (folder / "cyrillic.dcm", None)

    ds = _as_dx(folder / "utf8.dcm")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "山田^太郎=やまだ^たろう"
    ds.InstitutionName = "東京中央病院"
    ds.save_as(folder / "utf8.dcm", enforce_file_format=True)
    files["ISO_IR 192 Japanese"] = (folder / "utf8.dcm", "山田^太郎=やまだ^たろう")

    ds = _as_dx(folder / "jis.dcm")
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.StudyDescription = "胸部単純"
    ds.save_as(folder / "jis.dcm", enforce_file_format=True)
    files["ISO 2022 IR 87"] = (folder / "jis.dcm", "Yamada^Tarou=山田^太郎=やまだ^たろう")
    return files


def test_real_world_headers_end_done_with_valid_outputs_and_the_same_names(tmp_path: Path, orthanc: Orthanc) -> None:
    files = real_world_headers(tmp_path / "in")
    node = node_for(tmp_path, orthanc, outputs={"negative": ["seg", "sc"]}).start()
    try:
        orthanc.add_modality("ptx", node.ae_title, node.port)
        ids = [orthanc.upload(path) for path, _ in files.values()]
        orthanc.store_to_modality("ptx", ids)
        jobs = node.wait_for_terminal(len(files), timeout=600)
    finally:
        node.stop()

    by_uid = {j.sop_instance_uid: j for j in jobs}
    for name, (path, patient_name) in files.items():
        source = pydicom.dcmread(path, stop_before_pixels=True)
        job = by_uid[str(source.SOPInstanceUID)]
        assert job.status == JobStatus.DONE, (name, job.status, job.reason_code, job.error)
        outputs = outputs_in_orthanc(orthanc, str(source.StudyInstanceUID))
        assert len(outputs["SEG"]) == 1 and len(outputs["SC"]) == 1, (name, outputs)
        for kind in ("SEG", "SC"):
            out_path = tmp_path / f"{path.stem}-{kind}.dcm"
            out_path.write_bytes(orthanc.instance_file(outputs[kind][0]))
            errors = dciodvfy_errors(out_path)
            assert not errors, f"{name} {kind}: dciodvfy errors:\n" + "\n".join(errors)
            written = pydicom.dcmread(out_path)
            if patient_name is not None:
                assert str(written.PatientName) == patient_name, (name, kind, str(written.PatientName))
                declared = source.SpecificCharacterSet
                # an empty first value of a code-extension set means ISO 2022 IR 6 (PS3.3 C.12.1.1.2)
                expected = declared if isinstance(declared, str) else [t or "ISO 2022 IR 6" for t in declared]
                assert written.SpecificCharacterSet == expected, (name, kind, written.SpecificCharacterSet)
            else:  # repaired: declared UTF-8, and the job says what was repaired (no values)
                assert written.SpecificCharacterSet == "ISO_IR 192", (name, kind)
        if patient_name is None:
            assert job.header_repairs and "character set repaired" in job.header_repairs
            assert "Петров" not in job.header_repairs
    assert "Петров".encode("cp1251").decode("latin-1") not in node.log_text()

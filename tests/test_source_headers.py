"""The header the outputs copy, case by case: character-set fallback, no invented mm²,
PixelPaddingValue left out of windowing and of the mask."""

from __future__ import annotations

import copy
import warnings

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from node.config import load_config
from node.outputs import AlgorithmInfo, OutputPlan
from node.outputs.options import OutputKind
from node.outputs.sanitize import prepare_source_header
from node.outputs.seg import NOMINAL_SPACING_NOTE
from node.preparation import build_outputs, prepare_instance
from node.reasons import ReasonCode, RefusedInstance
from tests.outputs_helpers import ellipse_mask, prediction_for
from tests.test_header_mutations import SHAPE, minimal_dx

ALGORITHM = AlgorithmInfo(name="unetpp-b4", version="0.0.0", checkpoint_sha256=None, untrained=True)
BOTH = OutputPlan((OutputKind.SEG, OutputKind.SC))


@pytest.fixture(autouse=True)
def _quiet_header_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _config(tmp_path, **outputs):
    return load_config(None, environ={}, overrides={
        "spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'jobs.sqlite'}",
        "outputs": outputs,
    })


def _raw(ds: pydicom.Dataset, keyword: str, vr: str, value: bytes) -> None:
    if len(value) % 2:
        value += b" "
    tag = pydicom.datadict.tag_for_keyword(keyword)
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _outputs(ds: pydicom.Dataset, config):
    prepared = prepare_instance(ds, config)
    prediction = prediction_for(ellipse_mask(SHAPE), prepared.source.pixel_spacing_mm)
    built = build_outputs(prepared, prediction, BOTH, algorithm=ALGORITHM, options=config.outputs,
                          uids={OutputKind.SEG: (hd.UID(), hd.UID()), OutputKind.SC: (hd.UID(), hd.UID())})
    return prepared, prediction, built


def test_undeclared_8bit_text_is_read_with_the_configured_fallback(tmp_path) -> None:
    ds = minimal_dx()
    _raw(ds, "PatientName", "PN", "Петров^Сергей".encode("cp1251"))
    _, _, built = _outputs(ds, _config(tmp_path, fallback_character_set="cp1251"))
    for output in (built.seg, built.sc):
        assert output.SpecificCharacterSet == "ISO_IR 192"
        assert str(output.PatientName) == "Петров^Сергей"
    # the default fallback (ISO_IR 100) reads every byte: the same bytes, declared as what they became
    header = prepare_source_header(ds)
    assert str(header.dataset.PatientName) == "Петров^Сергей".encode("cp1251").decode("latin-1")
    assert any("character set repaired" in r and "PatientName" in r for r in header.repairs)
    assert not any("Петров" in r for r in header.repairs)


def test_an_unknown_fallback_character_set_is_refused_at_config_load(tmp_path) -> None:
    with pytest.raises(Exception, match="neither a DICOM character set"):
        _config(tmp_path, fallback_character_set="klingon")


@pytest.mark.parametrize("spacing", [None, "0\\0", "-0.1\\-0.1"])
def test_no_area_in_mm2_without_usable_spacing(tmp_path, spacing: str | None) -> None:
    ds = minimal_dx()
    if spacing is not None:
        _raw(ds, "PixelSpacing", "DS", spacing.encode())
    prepared, prediction, built = _outputs(ds, _config(tmp_path))
    assert prepared.source.pixel_spacing_mm is None and prediction.area_mm2 is None
    assert "mm2" not in built.sc.ImageComments and "cm2" not in built.sc.ImageComments
    assert "PixelSpacing" not in built.sc
    assert NOMINAL_SPACING_NOTE in built.seg.ImageComments  # the placeholder says it is one


def test_a_real_spacing_gives_an_area_and_no_nominal_note(tmp_path) -> None:
    ds = minimal_dx()
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.PixelSpacing = [0.5, 0.5]
    _, prediction, built = _outputs(ds, _config(tmp_path))
    assert prediction.area_mm2 == pytest.approx(prediction.area_px * 0.25)
    assert "cm2" in built.sc.ImageComments or "mm2" in built.sc.ImageComments
    assert NOMINAL_SPACING_NOTE not in built.seg.ImageComments


def test_padding_pixels_are_left_out_of_windowing_and_of_the_mask() -> None:
    from model import Segmenter, source_image_from_dataset
    from model.preprocess import preprocess

    ds = minimal_dx()
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(SHAPE).copy()
    stored = np.clip(stored, 1000, 3000)
    stored[:, :96] = 4095  # the unexposed strip a detector pads with, brighter than anything
    ds.PixelData = stored.tobytes()
    unpadded = source_image_from_dataset(ds)
    ds.PixelPaddingValue = 4095
    padded = source_image_from_dataset(ds)

    assert padded.padding is not None and padded.padding[:, :96].all() and not padded.padding[:, 96:].any()
    assert np.all(padded.pixels[:, :96] == 0.0)  # shown black
    # the window comes from the exposed pixels: they span the full range, as without the strip
    inside = padded.pixels[:, 96:]
    assert inside.max() > 0.95 and inside.min() < 0.05
    assert unpadded.pixels[:, 96:].max() < 0.8  # with the strip in the statistics, the image is dimmed

    segmenter = Segmenter.untrained(device="cpu", input_size=256, tta=False)
    net_input, transform = preprocess(padded, segmenter.preprocess_config)
    certain = np.ones(net_input.shape, dtype=np.float32)  # the network says "everywhere"
    prediction = segmenter._finish(padded, certain, transform)
    assert prediction.mask[:, 96:].any() and not prediction.mask[:, :96].any()


def test_header_value_that_is_not_a_uid_refuses_the_instance(tmp_path) -> None:
    ds = minimal_dx()
    _raw(ds, "StudyInstanceUID", "UI", b"1.2.840.abc")
    with pytest.raises(RefusedInstance) as refused:
        prepare_instance(copy.deepcopy(ds), _config(tmp_path))
    assert refused.value.reason.code == ReasonCode.MISSING_UID
    assert "abc" not in refused.value.reason.sentence

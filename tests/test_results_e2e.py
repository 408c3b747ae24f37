"""IHE AI Results end to end: Orthanc routes real radiographs (pydicom-data RG1_UNCR, RG1_J2KI,
deid-data cat.dcm) and a generated phantom to the node, and gets back, in each image's study,
a SEG, a TID 1500 SR, a GSPS and an SC overlay (positive) or the SR, GSPS and SC that
`[outputs] negative` lists. The result is forced by checkpoints whose last layer answers
"everything" or "nothing" (tests/forced_checkpoint.py), so nothing rests on an untrained
network's luck. One Orthanc and one node per checkpoint serve every image.

Every SR passes dciodvfy and PixelMed's DicomSRValidator (TID 1500 root template found),
every GSPS dciodvfy and dcmpschk; highdicom reads each SR back to the job row's numbers, its
SEG reference resolves to the SEG that arrived, and the SR's and the GSPS's polylines, filled,
match that SEG's mask (IoU >= 0.95).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from node.db import JobStatus
from tests.forced_checkpoint import forced_checkpoint
from tests.outputs_helpers import (
    dciodvfy_errors,
    dcmpschk_errors,
    fill_polylines,
    iou,
    pixelmed_errors,
    pixelmed_sr_reports,
)
from tests.services import (
    NodeProcess,
    Orthanc,
    base_node_config,
    deid_file,
    make_phantom,
    pydicom_file,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]

KINDS = ("seg", "sr", "gsps", "sc")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")


@dataclass
class Result:
    name: str
    source: pydicom.Dataset
    job: Any
    files: dict[str, Path] = field(default_factory=dict)  # kind -> file as Orthanc returned it
    orthanc_ids: dict[str, str] = field(default_factory=dict)


@dataclass
class Run:
    orthanc: Orthanc
    positive: dict[str, Result]
    negative: dict[str, Result]


def _route(orthanc: Orthanc, tmp: Path, checkpoint: Path, inputs: dict[str, Path], name: str,
           outputs: dict[str, Any]) -> tuple[NodeProcess, list[Any]]:
    workdir = tmp / name
    workdir.mkdir()
    destinations = [{"name": "orthanc", "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}]
    config = base_node_config(workdir, destinations=destinations, checkpoint=checkpoint,
                              model={"device": "cpu", "tta": False}, outputs=outputs)
    node = NodeProcess(workdir, config).start()
    try:
        orthanc.add_modality(name, node.ae_title, node.port)
        orthanc.store_to_modality(name, [orthanc.upload(path) for path in inputs.values()])
        return node, node.wait_for_terminal(len(inputs), timeout=900)
    finally:
        node.stop()


def _collect(orthanc: Orthanc, tmp: Path, inputs: dict[str, Path], jobs: list[Any], label: str) -> dict[str, Result]:
    by_uid = {job.sop_instance_uid: job for job in jobs}
    results = {}
    for name, path in inputs.items():
        source = pydicom.dcmread(path, stop_before_pixels=True)
        result = Result(name, source, by_uid[str(source.SOPInstanceUID)])
        for kind in KINDS:
            uid = getattr(result.job, f"{kind}_sop_instance_uid")
            if uid is None:
                continue
            (orthanc_id,) = orthanc.find_sop(uid)
            result.orthanc_ids[kind] = orthanc_id
            result.files[kind] = tmp / f"{label}-{name}-{kind}.dcm"
            result.files[kind].write_bytes(orthanc.instance_file(orthanc_id))
        results[name] = result
    return results


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("results-e2e")
    phantom = make_phantom(tmp / "phantom.dcm", seed=11, size=512)
    positive_inputs = {
        "RG1_UNCR": pydicom_file("RG1_UNCR.dcm"),
        "RG1_J2KI": pydicom_file("RG1_J2KI.dcm"),
        "cat": deid_file("animals/cat.dcm"),
        "phantom": phantom,
    }
    negative_inputs = {"cat": positive_inputs["cat"], "phantom": phantom}
    orthanc = Orthanc(tmp / "orthanc").start()
    try:
        _, positive_jobs = _route(orthanc, tmp, forced_checkpoint(tmp / "ck-positive", positive=True),
                                  positive_inputs, "ptxpos", {})
        _, negative_jobs = _route(orthanc, tmp, forced_checkpoint(tmp / "ck-negative", positive=False),
                                  negative_inputs, "ptxneg", {"negative": ["sr", "gsps", "sc"]})
        yield Run(orthanc,
                  _collect(orthanc, tmp, positive_inputs, positive_jobs, "positive"),
                  _collect(orthanc, tmp, negative_inputs, negative_jobs, "negative"))
    finally:
        orthanc.stop()


def test_every_object_arrives_in_the_source_study_in_delivery_order(run: Run) -> None:
    changes = run.orthanc.get("/changes?since=0&limit=10000")["Changes"]
    arrival = {c["ID"]: c["Seq"] for c in changes if c["ChangeType"] == "NewInstance"}
    for label, results, expected in (("positive", run.positive, KINDS), ("negative", run.negative, ("sr", "gsps", "sc"))):
        for name, result in results.items():
            job = result.job
            assert job.status == JobStatus.DONE, (label, name, job.status, job.error)
            assert job.positive is (label == "positive"), (label, name)
            assert tuple(result.files) == expected, (label, name, result.files)
            for kind, path in result.files.items():
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                assert ds.StudyInstanceUID == result.source.StudyInstanceUID, (label, name, kind)
                assert ds.SeriesInstanceUID == getattr(job, f"{kind}_series_instance_uid")
            order = sorted(result.orthanc_ids, key=lambda kind: arrival[result.orthanc_ids[kind]])
            assert tuple(order) == expected, f"{label} {name}: arrived in order {order}"


def test_every_sr_and_gsps_passes_dciodvfy_pixelmed_and_dcmpschk(run: Run) -> None:
    results = [*run.positive.values(), *run.negative.values()]
    for result in results:
        # the SEG and SC of these images are validated by tests/test_node_e2e.py
        for kind in ("sr", "gsps"):
            errors, output = dciodvfy_errors(result.files[kind])
            assert not errors, f"{result.name} {kind}: dciodvfy errors:\n{output}"
        if "gsps" in result.files:
            errors, output = dcmpschk_errors(result.files["gsps"])
            assert not errors, f"{result.name} GSPS: dcmpschk errors:\n{output}"
    srs = [result.files["sr"] for result in results]
    reports = pixelmed_sr_reports(srs)
    for path in srs:
        assert not pixelmed_errors(reports[path]), f"{path.name}: PixelMed DicomSRValidator:\n{reports[path]}"


def _seg_mask(path: Path) -> tuple[hd.seg.Segmentation, np.ndarray]:
    seg = hd.seg.segread(path)
    (source_uid,) = [uid for _, _, uid in seg.get_source_image_uids()]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[source_uid], segment_numbers=[1])
    return seg, pixels[0, :, :, 0].astype(bool)


@pytest.mark.parametrize("name", ["RG1_UNCR", "RG1_J2KI", "cat", "phantom"])
def test_positive_sr_and_gsps_read_back_to_the_job_row_and_the_seg(run: Run, name: str) -> None:
    result = run.positive[name]
    job = result.job
    seg, mask = _seg_mask(result.files["seg"])
    assert mask.sum() == job.area_px and job.n_components >= 1
    groups = hd.sr.srread(result.files["sr"]).content.get_planar_roi_measurement_groups()

    finding = groups[0]
    assert finding.finding_type == codes.SCT.Pneumothorax
    reference = finding.referenced_segmentation_frame[0].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == seg.SOPInstanceUID == job.seg_sop_instance_uid
    assert int(reference.ReferencedFrameNumber) <= int(seg.NumberOfFrames)
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1]
    assert float(finding.get_measurements(name=PROBABILITY)[0].value) == pytest.approx(job.max_probability)
    area = finding.get_measurements(name=codes.SCT.Area)
    if job.area_mm2 is None:
        assert not area, f"{name}: no usable spacing, yet an area"
    else:
        assert float(area[0].value) == pytest.approx(job.area_mm2)

    regions = groups[1:]
    assert len(regions) == job.n_components
    sr_polylines = [group.roi.value for group in regions]
    overlap = iou(fill_polylines(sr_polylines, mask.shape), mask)
    assert overlap >= 0.95, f"{name}: SR polylines vs SEG IoU {overlap:.3f}"

    pr = pydicom.dcmread(result.files["gsps"])
    (annotation,) = pr.GraphicAnnotationSequence
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == result.source.SOPInstanceUID
    gsps_polylines = [np.asarray(g.GraphicData, float).reshape(-1, 2) for g in annotation.GraphicObjectSequence]
    overlap = iou(fill_polylines(gsps_polylines, mask.shape), mask)
    assert overlap >= 0.95, f"{name}: GSPS polylines vs SEG IoU {overlap:.3f}"
    text = annotation.TextObjectSequence[0].UnformattedTextValue
    assert "NOT FOR DIAGNOSTIC USE" in text and f"{job.max_probability:.2f}" in text


@pytest.mark.parametrize("name", ["cat", "phantom"])
def test_negative_sr_says_absent_and_gsps_has_text_only(run: Run, name: str) -> None:
    result = run.negative[name]
    sr = hd.sr.srread(result.files["sr"])
    assert sr.content.get_planar_roi_measurement_groups() == []
    (group,) = sr.content.get_image_measurement_groups()
    assert group.get_qualitative_evaluations(name=codes.SCT.Pneumothorax)[0].value == codes.SCT.Absent
    (annotation,) = pydicom.dcmread(result.files["gsps"]).GraphicAnnotationSequence
    assert "GraphicObjectSequence" not in annotation
    assert "No pneumothorax detected" in annotation.TextObjectSequence[0].UnformattedTextValue

"""A model whose manifest carries a caveat (the demo model) says so on every output."""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import Manifest, save_checkpoint
from model.infer import Segmenter
from model.network import build_network
from model.preprocess import PreprocessConfig
from node.outputs import AlgorithmInfo, OutputOptions, algorithm_identification
from node.outputs._common import algorithm_sentence, series_description
from node.outputs.render import banner_lines

CAVEAT = "Demo model trained on synthetic phantoms, not for diagnostic use"


def test_caveat_reaches_series_descriptions_banner_and_seg_algorithm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    manifest = Manifest(name="Demo model trained on synthetic phantoms", version="0.1 not for diagnostic use",
                        architecture="unet", encoder="resnet18", input_size=64,
                        preprocess=PreprocessConfig(input_size=64).to_dict(), caveat=CAVEAT)
    checkpoint = save_checkpoint(tmp_path / "ckpt", build_network("unet", "resnet18"), manifest)
    algorithm = AlgorithmInfo.from_segmenter(Segmenter.from_checkpoint(checkpoint))
    assert algorithm.caveat == CAVEAT and not algorithm.untrained
    for options in (OutputOptions(), OutputOptions(diagnostic_disclaimer=False)):
        for kind in ("SEG", "OVERLAY", "SR", "GSPS"):
            description = series_description(kind, algorithm, options)
            assert description.lower() == CAVEAT.lower() and len(description) <= 64
        assert CAVEAT.upper() in banner_lines(algorithm, options)
    identification = algorithm_identification(algorithm)[0]
    assert "synthetic phantoms" in identification.AlgorithmName
    assert "not for diagnostic use" in identification.AlgorithmVersion
    assert CAVEAT in algorithm_sentence(algorithm)


def test_models_without_caveat_keep_their_labels() -> None:
    plain = AlgorithmInfo(name="m", version="1", checkpoint_sha256="0" * 64, untrained=False)
    assert series_description("SEG", plain, OutputOptions()) == "PTX SEG (NOT FOR DIAGNOSTIC USE)"
    assert banner_lines(plain, OutputOptions()) == ["NOT FOR DIAGNOSTIC USE"]


def test_demo_scores_the_returned_seg_against_the_known_mask(tmp_path: Path) -> None:
    from types import SimpleNamespace

    import cv2
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    from node.demo.run import _phantom_dice
    from node.outputs import build_seg
    from trainer.synth import make_phantom, write_dicom

    image, truth = make_phantom(np.random.default_rng(7), 128, positive=True)
    source = pydicom.dcmread(write_dicom(tmp_path / "phantom.dcm", image))
    mask_path = tmp_path / f"{source.SOPInstanceUID}.png"
    cv2.imwrite(str(mask_path), truth.astype(np.uint8) * 255)
    predicted = truth.copy()
    predicted[:, : truth.shape[1] // 2] = False  # lose the left half of the truth
    expected = 2 * predicted.sum() / (predicted.sum() + truth.sum())
    algorithm = AlgorithmInfo(name="Demo model trained on synthetic phantoms", version="0.1",
                              checkpoint_sha256="0" * 64, untrained=False, caveat=CAVEAT)
    seg_uid = generate_uid()
    seg = build_seg(source, predicted, algorithm=algorithm, series_instance_uid=generate_uid(),
                    sop_instance_uid=seg_uid, options=OutputOptions())
    (tmp_path / "received").mkdir()
    seg.save_as(tmp_path / "received" / f"{seg_uid}.dcm")
    job = SimpleNamespace(sop_instance_uid=source.SOPInstanceUID, seg_sop_instance_uid=seg_uid)
    line = _phantom_dice(mask_path, [job], None, False, tmp_path)
    assert line == f"phantom Dice vs known mask: {expected:.2f}"
    no_seg = SimpleNamespace(sop_instance_uid=source.SOPInstanceUID, seg_sop_instance_uid=None)
    assert _phantom_dice(mask_path, [no_seg], None, False, tmp_path).startswith("phantom Dice vs known mask: 0.00")

"""Segmenter: TTA equivariance, DICOM in, batch == single (few small forwards)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.checkpoint import Manifest
from model.infer import Segmenter
from model.network import build_network
from model.postprocess import Prediction
from model.preprocess import PreprocessConfig, SourceImage, source_image_from_dataset


@pytest.fixture(scope="module")
def small_segmenter() -> Segmenter:
    torch.manual_seed(3)
    network = build_network("unet", "efficientnet-b0")
    manifest = Manifest(
        name="small", version="0", architecture="unet", encoder="efficientnet-b0", input_size=64,
        preprocess=PreprocessConfig(input_size=64, clahe=False).to_dict(),
    )
    return Segmenter(network, manifest, tta=True)


@pytest.mark.parametrize("runtime", ["auto", "torch"])
def test_hflip_tta_is_equivariant(small_segmenter: Segmenter, runtime: str) -> None:
    small_segmenter = Segmenter(small_segmenter.network, small_segmenter.manifest, runtime=runtime)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 64, 64)).astype(np.float32)
    plain = small_segmenter.predict_probability_net(x, tta=False)[0]
    tta = small_segmenter.predict_probability_net(x, tta=True)[0]
    flipped_tta = small_segmenter.predict_probability_net(x[:, :, ::-1].copy(), tta=True)[0]
    np.testing.assert_allclose(flipped_tta, tta[:, ::-1], atol=1e-5)
    # Without TTA a random network is not equivariant: the test above can fail.
    flipped_plain = small_segmenter.predict_probability_net(x[:, :, ::-1].copy(), tta=False)[0]
    assert np.abs(flipped_plain - plain[:, ::-1]).max() > 1e-3
    # TTA is the mean of the two views.
    np.testing.assert_allclose(tta, (plain + flipped_plain[:, ::-1]) / 2, atol=1e-5)


def test_source_level_equivariance(small_segmenter: Segmenter) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.random((80, 100), dtype=np.float32)
    a = small_segmenter.predict(SourceImage(pixels=pixels))
    b = small_segmenter.predict(SourceImage(pixels=np.ascontiguousarray(pixels[:, ::-1])))
    np.testing.assert_allclose(b.probability, a.probability[:, ::-1], atol=1e-5)


def test_predict_batch_matches_predict(small_segmenter: Segmenter, cr_16x16) -> None:
    rng = np.random.default_rng(2)
    images = [SourceImage(pixels=rng.random((70, 90), dtype=np.float32)), source_image_from_dataset(cr_16x16)]
    batch = small_segmenter.predict_batch(images)
    for image, prediction in zip(images, batch, strict=True):
        single = small_segmenter.predict(image)
        np.testing.assert_allclose(prediction.probability, single.probability, atol=1e-5)
        assert prediction.probability.shape == image.shape
    assert small_segmenter.predict_batch([]) == []


def test_predict_from_dataset_at_source_resolution(small_segmenter: Segmenter, cr_16x16) -> None:
    pred = small_segmenter.predict(cr_16x16, tta=False)
    assert isinstance(pred, Prediction)
    assert pred.probability.shape == (16, 16) and pred.mask.shape == (16, 16)
    assert pred.mask.dtype == np.bool_ and pred.probability.dtype == np.float32
    assert 0.0 <= pred.probability.min() and pred.probability.max() <= 1.0
    assert pred.score == pytest.approx(float(pred.probability.max()))
    assert pred.area_px == int(pred.mask.sum())
    assert pred.area_mm2 == pytest.approx(pred.area_px * 0.01)  # ImagerPixelSpacing 0.1 mm


def test_input_validation(small_segmenter: Segmenter) -> None:
    with pytest.raises(ValueError, match=r"shape \(N, S, S\)"):
        small_segmenter.predict_probability_net(np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="divisible by 32"):
        small_segmenter.predict_probability_net(np.zeros((1, 60, 60), np.float32))
    with pytest.raises(ValueError, match="Device must be 'cpu' or 'cuda"):
        Segmenter(small_segmenter.network, small_segmenter.manifest, device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Segmenter(small_segmenter.network, small_segmenter.manifest, device="cuda")


def test_untrained_unetplusplus_b4(cat) -> None:
    seg = Segmenter.untrained(input_size=64, seed=0)
    assert seg.untrained and seg.checkpoint_sha256 is None and seg.name == "untrained"
    assert seg.manifest.architecture == "unetplusplus" and seg.manifest.encoder == "efficientnet-b4"
    assert str(seg.device) == "cpu"
    again = Segmenter.untrained(input_size=64, seed=0)
    for key, value in seg.network.state_dict().items():
        assert torch.equal(value, again.network.state_dict()[key]), key
    pred = seg.predict(cat)
    assert pred.probability.shape == (2614, 3072)
    assert pred.area_mm2 is not None


def test_onnxruntime_matches_torch_within_tolerance(small_segmenter: Segmenter, tmp_path) -> None:
    from model.runtime import CPU_RUNTIME_PROB_TOLERANCE

    from .conftest import require_onnxruntime

    require_onnxruntime()
    kwargs = dict(tta=True, cache_dir=tmp_path)
    ort_seg = Segmenter(small_segmenter.network, small_segmenter.manifest, runtime="onnxruntime", **kwargs)
    torch_seg = Segmenter(small_segmenter.network, small_segmenter.manifest, runtime="torch", **kwargs)
    assert ort_seg.runtime_name == "onnxruntime" and torch_seg.runtime_name == "torch"
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 64, 64)).astype(np.float32)
    a = ort_seg.predict_probability_net(x)
    b = torch_seg.predict_probability_net(x)
    assert np.abs(a - b).max() < CPU_RUNTIME_PROB_TOLERANCE
    # The export is cached by weights and shape: a second segmenter reuses the file.
    assert len(list(tmp_path.glob("*.onnx"))) == 1
    again = Segmenter(small_segmenter.network, small_segmenter.manifest, runtime="onnxruntime", **kwargs)
    np.testing.assert_array_equal(again.predict_probability_net(x), a)
    assert len(list(tmp_path.glob("*.onnx"))) == 1


def test_runtime_validation(small_segmenter: Segmenter) -> None:
    with pytest.raises(ValueError, match="runtime must be one of auto, torch, onnxruntime"):
        Segmenter(small_segmenter.network, small_segmenter.manifest, runtime="tensorrt")


def test_tta_registries_agree_and_warmup(small_segmenter: Segmenter) -> None:
    from model.checkpoint import KNOWN_TTA
    from model.infer import TTA_TRANSFORMS

    assert set(TTA_TRANSFORMS) == set(KNOWN_TTA)
    seg = Segmenter(small_segmenter.network, small_segmenter.manifest, tta=False, runtime="torch")
    seg.warmup()
    assert seg.runtime_name == "torch" and seg.tta is False

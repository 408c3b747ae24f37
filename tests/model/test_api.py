"""The public names of the model package (the contract node and trainer code against)."""

from __future__ import annotations

import subprocess
import sys


def test_public_names_resolve_to_the_contract_objects() -> None:
    import model
    import model.postprocess  # noqa: F401 - importing a submodule must not shadow the function
    import model.preprocess  # noqa: F401
    from model import postprocess, preprocess

    assert callable(preprocess) and preprocess.__module__ == "model.preprocess"
    assert callable(postprocess) and postprocess.__module__ == "model.postprocess"
    for name in model.__all__:
        assert getattr(model, name) is not None, name
    from model import Segmenter, build_network, save_checkpoint

    assert Segmenter.__module__ == "model.infer"
    assert build_network.__module__ == "model.network"
    assert save_checkpoint.__module__ == "model.checkpoint"


def test_pixels_and_manifest_need_no_torch() -> None:
    code = (
        "import sys\n"
        "from model import preprocess, postprocess, PreprocessConfig, source_image_from_dataset\n"
        "from model.checkpoint import Manifest\n"
        "Manifest(name='n', version='1')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
